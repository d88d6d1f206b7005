from compress.tokens.schedule import block_macs, estimated_speedup, search_strength


def test_estimated_speedup_of_halved_tokens():
    assert estimated_speedup([100, 100, 100], 64) == 1.0
    s = estimated_speedup([100, 50, 50], 64)
    full = 2 * block_macs(100, 100, 64)
    assert abs(s - full / (block_macs(100, 50, 64) + block_macs(50, 50, 64))) < 1e-9
    assert 1.3 < s < 2


def test_search_picks_strongest_passing_and_weakest_fast_enough():
    cands = list(range(11))
    speed = lambda c: 1 + 0.1 * c  # noqa: E731
    calls = []

    def ok(c):
        calls.append(c)
        return c <= 6

    choice, trials = search_strength(cands, speed, ok, None)
    assert choice == 6 and len(calls) <= 4 and len(trials) == len(calls)
    choice, _ = search_strength(cands, speed, None, 1.45)
    assert choice == 5
    choice, _ = search_strength(cands, speed, ok, 1.35)   # fast enough at 4: no stronger
    assert choice == 4
