import pytest
import torch

from compress.tokens.interpret import (
    PerBlockAgent,
    count_keep,
    gather_kept,
    group_benefits,
    group_rewards,
    keep_decisions,
    keep_log_prob,
    leave_one_out_baseline,
    reinforce_loss,
)


def test_class_token_never_dropped():
    agent = PerBlockAgent(16, heads=2, head_dim=4, init_keep=0.9)
    torch.nn.init.normal_(agent.k.weight, std=2.0)   # scores far from the initial 0.9
    x = torch.randn(8, 10, 16)
    p = agent(x, None, protected=2)
    assert torch.equal(p[:, :2], torch.ones(8, 2))
    low = torch.zeros(8, 10)                          # every token scored 0
    for sample in (False, True):
        u = keep_decisions(low, None, 2, 0.5, sample=sample)
        assert torch.equal(u[:, :2], torch.ones(8, 2)) and u[:, 2:].sum() == 0


def test_agent_starts_near_init_keep():
    agent = PerBlockAgent(32, heads=3, head_dim=8, init_keep=0.9)
    p = agent(torch.randn(4, 20, 32), None, protected=1)
    assert (p[:, 1:] - 0.9).abs().max() < 0.03


def test_masks_are_hierarchical():
    u_prev = torch.tensor([[1., 1., 0., 1., 0.]])
    p_high = torch.ones(1, 5)
    assert torch.equal(keep_decisions(p_high, u_prev, 1, 0.5), u_prev)
    assert torch.equal(keep_decisions(p_high, u_prev, 1, sample=True), u_prev)
    # The interpreter scores tokens dropped earlier 0 (and zeroes them before its LayerNorm).
    agent = PerBlockAgent(8, heads=2, head_dim=4)
    p = agent(torch.randn(1, 5, 8), u_prev, protected=1)
    assert p[0, 2] == 0 and p[0, 4] == 0 and p[0, 1] > 0.5
    # Only tokens still alive count in the policy's log-likelihood.
    u = torch.tensor([[1., 1., 0., 0., 0.]])
    lp = keep_log_prob(torch.full((1, 5), 0.5), u, u_prev, 1)
    assert lp.item() == pytest.approx(2 * torch.log(torch.tensor(0.5)).item())


def test_rewards_and_baseline_numbers():
    benefits = group_benefits([0, 4, 8], 12)
    assert benefits.tolist() == pytest.approx([1.0, 2 / 3, 1 / 3])
    kept = torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.1, 0.1]])
    r = group_rewards(kept, torch.tensor([True, False]), benefits, error_penalty=-1.0)
    assert r[0].tolist() == pytest.approx([0.75, 0.5, 0.25])
    assert r[1].tolist() == [-1.0, -1.0, -1.0]
    # A keep-rate floor: below the target earns as much as the target itself.
    r_t = group_rewards(torch.tensor([[0.2], [0.4]]), torch.tensor([True, True]),
                        torch.ones(1), target=0.4)
    assert r_t[:, 0].tolist() == [1.0, 1.0]
    # Two draws of two images (row j*B + i): each draw's baseline is the other draw.
    rewards = torch.tensor([[1.0], [2.0], [3.0], [6.0]])
    assert leave_one_out_baseline(rewards, 2)[:, 0].tolist() == [3.0, 6.0, 1.0, 2.0]


def test_gather_keeps_batch_max_in_order_and_masks_the_rest():
    x = torch.arange(2 * 6, dtype=torch.float32).reshape(2, 6, 1)
    u = torch.tensor([[1., 0., 1., 1., 0., 1.], [1., 1., 0., 0., 0., 0.]])
    p = torch.tensor([[1., .1, .9, .8, .2, .7], [1., .9, .05, .6, .1, .2]])
    assert count_keep(u[:, 1:]) == 3
    xg, ug, idx = gather_kept(x, u, p, protected=1)
    assert xg[0, :, 0].tolist() == [0, 2, 3, 5]                # its own kept tokens, in order
    # Sample 2 keeps one token and carries the two dropped ones with the highest p (3, 5),
    # masked out.
    assert xg[1, :, 0].tolist() == [6, 7, 9, 11]
    assert ug.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert idx.tolist() == [[1, 2, 4], [0, 2, 4]]


def test_reinforce_learns_to_drop_noise_and_keep_the_signal():
    """Toy task: one of 8 tokens carries the answer; the model is right iff it is kept."""
    torch.manual_seed(0)
    n, dim, batch = 8, 16, 64
    agent = PerBlockAgent(dim, heads=2, head_dim=8, init_keep=0.9)
    opt = torch.optim.Adam(agent.parameters(), lr=1e-2)
    cls = torch.randn(dim)
    benefits = torch.ones(1)

    def episode(samples: int):
        x = torch.randn(batch, 1 + n, dim) * 0.5
        x[:, 0] = cls
        where = torch.randint(1, 1 + n, (batch,))
        x[torch.arange(batch), where, 0] += 4.0              # the signal token
        x, where = x.repeat(samples, 1, 1), where.repeat(samples)
        p = agent(x, None, 1)
        u = keep_decisions(p, None, 1, sample=True)
        correct = u[torch.arange(len(x)), where] > 0
        kept = u[:, 1:].sum(1, keepdim=True) / n
        return p, u, correct, kept

    def evaluate():
        with torch.no_grad():
            p, _, _, _ = episode(1)
            u = keep_decisions(p, None, 1, 0.5)
        return u

    stats = []
    for _step in range(150):
        p, u, correct, kept = episode(4)
        rewards = group_rewards(kept, correct, benefits)
        loss = reinforce_loss(keep_log_prob(p, u, None, 1)[:, None], rewards,
                              leave_one_out_baseline(rewards, 4))
        opt.zero_grad()
        loss.backward()
        opt.step()
        stats.append((rewards.mean().item(), kept.mean().item(), correct.float().mean().item()))
    first = torch.tensor(stats[:10]).mean(0)
    last = torch.tensor(stats[-10:]).mean(0)
    assert first[1] > 0.8 and last[1] < 0.35                 # kept fraction falls
    assert last[0] > first[0] + 0.3                          # mean reward rises
    assert last[2] >= 0.9                                    # still right (sampled masks)
