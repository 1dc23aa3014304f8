"""The scorers against their published definitions: Expected Attention (kvpress) and SnapKV's pooling."""

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_gemma3, tiny_model

from lukv_compile.policy import scorers
from lukv_compile.policy.scorers import expected_attention, snapkv
from lukv_compile.profiling.oracle import record_prefill


def kvpress_expected_attention(q_pre, keys, values, cos, sin, n_sink=4):
    """kvpress's ExpectedAttentionPress.score (defaults), written out: q_pre [1, Hq, T, D] pre-RoPE queries,
    keys/values [1, H, T, D] post-RoPE, cos/sin [N_FUTURE, D] of the positions after the prompt."""
    b, h, t, d = keys.shape
    group = q_pre.shape[1] // h
    qs = q_pre[:, :, n_sink:]
    mean = qs.mean(dim=2, keepdim=True)
    centred = qs - mean
    cov = torch.einsum("bnsi,bnsj->bnij", centred, centred) / qs.shape[2]
    eye, rot = torch.eye(d), torch.zeros(d, d)
    rot[d // 2:, :d // 2], rot[:d // 2, d // 2:] = torch.eye(d // 2), -torch.eye(d // 2)
    r = (cos.unsqueeze(1) * eye + sin.unsqueeze(1) * rot).mean(dim=0)
    mean, cov = mean.squeeze(2) @ r.T, r @ cov @ r.T
    keys, values = keys[:, :, n_sink:], values[:, :, n_sink:]
    kt = keys.repeat_interleave(group, dim=1).transpose(2, 3)
    logits = (mean.unsqueeze(2) @ kt).squeeze(2) / math.sqrt(d)
    logits = logits + torch.einsum("bhin,bhij,bhjn->bhn", kt, cov, kt) / d / 2
    scores = logits.softmax(dim=-1).view(b, h, group, t - n_sink).mean(dim=2) * values.norm(dim=-1)
    return F.pad(scores, (n_sink, 0), value=scores.max().item())


def pre_rope_queries(model, ids):
    """Each layer's q_proj output as [1, Hq, T, D] (the queries before RoPE)."""
    config, out = model.config, {}
    hooks = [layer.self_attn.q_proj.register_forward_hook(
        lambda mod, inp, o, i=i: out.__setitem__(i, o.view(1, ids.shape[1], config.num_attention_heads, -1)
                                                 .transpose(1, 2)))
        for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return out


def test_expected_attention_is_kvpress_formula_on_a_real_model():
    model = tiny_model("llama", layers=2, q_heads=4, kv_heads=2, head_dim=16, seed=1)
    ids = torch.randint(1, 128, (1, 70), generator=torch.Generator().manual_seed(0))
    record = record_prefill(model, ids[0])
    q_pre = pre_rope_queries(model, ids)
    t = ids.shape[1]
    future = torch.arange(t, t + expected_attention.N_FUTURE)[None]
    cos, sin = (x[0] for x in model.model.rotary_emb(q_pre[0], future))
    ropes = scorers.layer_ropes(model.config)
    for layer in range(2):
        q, k, v = record.q[layer], record.k[layer], record.v[layer]
        ours = scorers.score("expected_attention", q, k, v, torch.ones(k.shape[:3], dtype=torch.bool),
                             record.scaling[layer], rope=ropes[layer])
        theirs = kvpress_expected_attention(q_pre[layer].float(), k.float(), v.float(), cos, sin)
        torch.testing.assert_close(ours[..., 4:], theirs[..., 4:], rtol=2e-4, atol=1e-7)
        assert bool((ours[..., :4] >= ours[..., 4:].amax(dim=-1, keepdim=True)).all())  # sinks ranked first


def test_expected_attention_ignores_padding_queries_and_needs_rope():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 12, 8, generator=gen)
    k, v = torch.randn(2, 1, 2, 12, 8, generator=gen)
    rope = scorers.Rope.from_theta(8, 10000.0)
    alone = scorers.score("expected_attention", q[:, :, 3:], k[:, :, 3:], v[:, :, 3:],
                          torch.ones(1, 2, 9, dtype=torch.bool), rope=rope)
    real = torch.arange(12)[None] >= 3
    padded = scorers.score("expected_attention", q, k, v, real[:, None].expand(1, 2, 12), rope=rope, queries=real)
    torch.testing.assert_close(padded[..., 3:], alone)
    with pytest.raises(ValueError, match="needs the model's RoPE"):
        scorers.score("expected_attention", q, k, v, torch.ones(1, 2, 12, dtype=torch.bool))


@pytest.mark.parametrize("make", [lambda: tiny_model("llama"), tiny_gemma3])
def test_layer_ropes_match_the_models_rotary_embedding(make):
    model = make()
    emb, config = model.model.rotary_emb, model.config
    types = getattr(config, "layer_types", None) or [None] * config.num_hidden_layers
    for rope, kind in zip(scorers.layer_ropes(config), types, strict=True):
        expected = emb.inv_freq if kind is None else getattr(emb, f"{kind}_inv_freq")
        torch.testing.assert_close(rope.inv_freq, expected.float())


def test_snapkv_pools_the_prefix_only():
    t, w = 60, snapkv.WINDOW
    q, k = torch.zeros(1, 1, t, 8), torch.zeros(1, 1, t, 8)
    q[..., -w:, 0] = 5.0
    k[..., t - w, 0] = 5.0  # the window's first token draws all of the window's attention
    k[..., 10, 0] = 4.0  # and a prefix token some of it
    s = scorers.score("snapkv", q, k, torch.ones(1, 1, t, 8), torch.ones(1, 1, t, dtype=torch.bool))[0, 0]
    prefix = s[:t - w]
    assert bool((prefix[7:14] == prefix[10]).all()) and prefix[10] > prefix[20]  # pooled around token 10
    assert prefix[-3:].max() < 0.1 * s[t - w]  # the window's token does not spill into the prefix


def test_keydiff_scores_are_minus_cosine_to_the_mean_unit_key():
    """KeyDiff by hand: anchor = mean of each head's valid unit keys, score = -cos(key, anchor)."""
    gen = torch.Generator().manual_seed(3)
    b, h, t, d = 2, 3, 11, 8
    k = torch.randn(b, h, t, d, generator=gen, dtype=torch.float64)
    valid = torch.ones(b, h, t, dtype=torch.bool)
    valid[0, 1, :4] = False  # left padding of one head
    valid[1, 2, :7] = False  # a head holding fewer tokens than the longest
    got = scorers.score("keydiff", torch.randn(b, 4 * h, 5, d, generator=gen), k.float(), torch.randn(b, h, t, d),
                        valid)
    assert got.shape == (b, h, t) and got.dtype == torch.float32
    for i in range(b):
        for j in range(h):
            keys = k[i, j]
            units = [keys[n] / math.sqrt(sum(x * x for x in keys[n].tolist())) for n in range(t)]
            real = [n for n in range(t) if valid[i, j, n]]
            anchor = sum(units[n] for n in real) / len(real)
            anchor_norm = math.sqrt(sum(x * x for x in anchor.tolist()))
            want = torch.tensor([-float(units[n] @ anchor) / anchor_norm for n in range(t)])
            torch.testing.assert_close(got[i, j, real], want[real].float(), rtol=1e-5, atol=1e-6)


def test_keydiff_ranks_the_mean_key_lowest_and_ignores_padding():
    s = 1 / math.sqrt(2)
    # Unit keys e1, e2 and (e1 + e2)/sqrt(2): their mean points along e1 + e2, so the third key has cosine 1
    # (score -1, the lowest possible) and the other two cosine 1/sqrt(2). The padded first slot must not pull
    # the mean towards itself.
    k = torch.tensor([[[[-9.0, 4.0], [1.0, 0.0], [0.0, 3.0], [2.0, 2.0]]]])
    valid = torch.tensor([[[False, True, True, True]]])
    got = scorers.score("keydiff", torch.randn(1, 1, 2, 2), k, torch.ones(1, 1, 4, 2), valid)[0, 0]
    torch.testing.assert_close(got[1:], torch.tensor([-s, -s, -1.0]))
    assert int(got[1:].argmin()) == 2


def window_ea_by_hand(q, k, v, valid, scale, window=32, epsilon=0.02):
    """Window Expected Attention written out per (batch, query head): a Gaussian fit (mean, unbiased
    covariance) of the last `window` queries, E[exp(q.k s)] = exp(s mu.k + s^2 k^T S k / 2) normalised over
    the head's valid keys, averaged over the GQA group, plus epsilon, times ||v||."""
    q, k, v = q.double(), k.double(), v.double()
    b, hq, c, d = q.shape
    h, t = k.shape[1], k.shape[2]
    group = hq // h
    out = torch.zeros(b, h, t, dtype=torch.float64)
    for i in range(b):
        for head in range(hq):
            kv = head // group  # query heads [kv*group, (kv+1)*group) share KV head kv
            qw = q[i, head, max(c - window, 0):]
            mu = qw.mean(dim=0)
            cov = torch.cov(qw.T, correction=1) if len(qw) > 1 else torch.zeros(d, d, dtype=q.dtype)  # n - 1
            logits = []
            for n in range(t):
                key = k[i, kv, n]
                logits.append(scale * float(mu @ key) + 0.5 * scale**2 * float(key @ cov @ key))
            real = [n for n in range(t) if valid[i, kv, n]]
            top = max(logits[n] for n in real)
            total = sum(math.exp(logits[n] - top) for n in real)
            for n in real:
                out[i, kv, n] += math.exp(logits[n] - top) / total / group
    return (out + epsilon) * v.norm(dim=-1)


@pytest.mark.parametrize("chunk", [45, 6])  # more queries than the 32-query window, and fewer
def test_window_expected_attention_scores_by_hand(chunk):
    gen = torch.Generator().manual_seed(4)
    b, hq, h, t, d = 2, 4, 2, 13, 8
    q = torch.randn(b, hq, chunk, d, generator=gen) * 0.7
    k, v = torch.randn(2, b, h, t, d, generator=gen)
    valid = torch.ones(b, h, t, dtype=torch.bool)
    valid[1, 0, :5] = False
    got = scorers.score("window_expected_attention", q, k, v, valid, scale=0.3)
    want = window_ea_by_hand(q, k, v, valid, scale=0.3)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1, 0, :5], 0.02 * v[1, 0, :5].norm(dim=-1))  # padding: no attention, only eps


def test_window_expected_attention_hand_checkable_values():
    e1 = torch.tensor([1.0, 0.0, 0.0, 0.0])
    values = torch.tensor([[[[1.0, 0, 0, 0], [0, 2.0, 0, 0]]]])
    valid = torch.ones(1, 1, 2, dtype=torch.bool)
    # One query (no covariance): attention softmax(q.k) = (3/4, 1/4) when q.k0 = ln 3 and q.k1 = 0.
    q = e1.view(1, 1, 1, 4)
    k = torch.stack([math.log(3) * e1, torch.zeros(4)]).view(1, 1, 2, 4)
    got = scorers.score("window_expected_attention", q, k, values, valid, scale=1.0)[0, 0]
    torch.testing.assert_close(got, torch.tensor([(0.75 + 0.02) * 1, (0.25 + 0.02) * 2]))
    # Two queries +-e1 (mean 0, unbiased covariance 2 e1 e1^T): logit k.S.k / 2 = k_1^2, so k0 = sqrt(ln 3) e1
    # draws 3/4 again (the biased covariance would give sqrt(3) : 1 instead).
    q = torch.stack([e1, -e1]).view(1, 1, 2, 4)
    k = torch.stack([math.sqrt(math.log(3)) * e1, torch.zeros(4)]).view(1, 1, 2, 4)
    got = scorers.score("window_expected_attention", q, k, values, valid, scale=1.0)[0, 0]
    torch.testing.assert_close(got, torch.tensor([(0.75 + 0.02) * 1, (0.25 + 0.02) * 2]))
