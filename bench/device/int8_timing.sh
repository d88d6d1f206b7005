#!/bin/bash
# Device-side INT8 timing on a VNNI/AMX CPU: builds use every core, timing pinned to cores 2,3.
grep -o -w -E 'avx2|avx512f|avx512_vnni|avx_vnni|amx_int8' /proc/cpuinfo | sort | uniq -c > $OUT/flags.txt
lscpu | grep -E 'Model name|^CPU\(s\)|Thread|Socket|MHz' > $OUT/lscpu.txt; nvidia-smi -L >> $OUT/lscpu.txt
cat $OUT/flags.txt $OUT/lscpu.txt
python -c "import pydantic" 2>/dev/null || python -m pip install -q --no-index --no-deps --root-user-action=ignore .whl/*.whl 2>&1 | tail -3
export COMPRESS_CACHE=$PWD/.gpu/cache
python bench/device/prep_caches.py > /dev/null 2>&1
timeout ${BENCH_TIMEOUT:-400} python bench/quantization.py --models ${MODELS:-deit,minilm} --ours fast --repeats ${REPEATS:-20} --timing-cores 2,3 --out $OUT/q 2>&1 | grep -v -i warn | tail -40
rm -rf $OUT/q/*/
