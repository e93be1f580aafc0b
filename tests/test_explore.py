"""The explorers' three layers: each data function (workbench.analysis) against a naive reference or the theorem
it illustrates, the sampling helpers (workbench.experiments.real_logits) against the trainer's convention, and the
explorers' redraw (workbench.viz.explore: traces equal the static builder)."""

from __future__ import annotations

import math

import plotly.graph_objects as go
import pytest
import torch

from workbench import analysis as an
from workbench import dvp, metrics
from workbench.experiments import real_logits as rl
from workbench.models import TinyModelConfig, build_tiny_model, build_tokenizer
from workbench.viz import explore as ex


def _logits(rows: int, vocab: int, scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(rows, vocab, generator=g)


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, object]:
    tok = build_tokenizer(64)
    model = build_tiny_model(TinyModelConfig(vocab_size=64, hidden_size=32, num_layers=1, seed=0), tok)
    return model, tok


# ----------------------------------------------------------------------------------------------------
# real logits


def test_fp32_engine_matches_trainer_logits_and_bf16_does_not(tiny) -> None:
    model, tok = tiny
    same = rl.sample_policy(model, tok, "addition", num_prompts=4, n=2, engine_dtype="fp32", seed=1)
    assert same.logits.shape[:2] == same.tokens.shape == same.mask.shape
    assert float(same.delta.abs().max()) < 1e-4  # same position-id convention as the engine
    low = rl.sample_policy(model, tok, "addition", num_prompts=4, n=2, engine_dtype="bf16", seed=1)
    assert float(low.delta.abs().max()) > 1e-4
    torch.testing.assert_close(rl.precision_logits(model, same.rollout, "fp32"), same.logits)
    assert an.valid_rows(same).shape == (int(same.mask.sum()), 64)
    with pytest.raises(ValueError, match="engine_dtype"):
        rl.sample_policy(model, tok, engine_dtype="fp8")


def test_mismatch_summary_and_bin_figure_use_the_metrics_module(tiny) -> None:
    model, tok = tiny
    s = rl.sample_policy(model, tok, "addition", num_prompts=4, n=2, engine_dtype="bf16", seed=2)
    [row] = an.mismatch_summary({"bf16": s})
    m = metrics.mismatch_metrics(s.logp_train, s.logp_infer, s.mask)
    assert row["k3"] == m["mismatch/k3"] and row["mean_abs_delta"] == m["mismatch/mean_abs_delta"]
    assert row["tokens"] == float(s.mask.sum())
    fig = ex.mismatch_by_bin_figure({"a": s, "b": s})
    assert len(fig.data) == 4  # a line and a bar per engine


# ----------------------------------------------------------------------------------------------------
# 02: Prop 4.2


@pytest.mark.parametrize("kind", ["vertex", "uniform"])
@pytest.mark.parametrize("eps", [0.01, 0.3, 1.5])
def test_envelope_points_respect_prop42(kind: str, eps: float) -> None:
    z = _logits(6, 200, 4.0, seed=0)
    d = an.envelope_data(z, eps, kind=kind, max_points=500)
    tol = 1e-12
    assert bool((d["abs_delta"] <= d["exact"] + tol).all())
    assert bool(
        (d["abs_delta"] <= d["attainable"] + tol).all()
    )  # the vertex optimum bounds every δ in the box
    assert bool((d["attainable"] <= d["exact"] + tol).all())
    assert d["max_ratio_exact"] <= 1 + 1e-9
    assert d["max_ratio_first_order"] <= math.expm1(2 * eps) / (2 * eps) + 1e-9  # first order, exact form
    assert d["p"].numel() == 500 and bool((d["p"] >= 1e-2).sum() >= 6)  # every confident token kept
    torch.testing.assert_close(d["first_order"], 2 * eps * (1 - d["p"]).double(), rtol=1e-6, atol=1e-12)


def test_vertex_perturbation_nearly_attains_the_bound() -> None:
    d = an.envelope_data(_logits(8, 100, 3.0, seed=1), 0.2, kind="vertex")
    assert d["max_ratio_exact"] > 0.9  # random signs hit the worst case for some token


def test_envelope_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="eps"):
        an.envelope_data(_logits(2, 5, 1.0, 0), 0.0)
    with pytest.raises(ValueError, match="kind"):
        an.envelope_data(_logits(2, 5, 1.0, 0), 0.1, kind="gauss")
    with pytest.raises(ValueError, match=r"\(R, V\)"):
        an.envelope_data(torch.zeros(5), 0.1)


def test_precision_envelope_measures_each_rows_shift_invariant_eps() -> None:
    from workbench.theory import logit_error

    z = _logits(5, 50, 3.0, seed=2).double()
    g = torch.Generator().manual_seed(3)
    delta = 0.05 * (2 * torch.rand(z.shape, generator=g, dtype=torch.float64) - 1)
    delta[:, 0], delta[:, 1] = 0.05, -0.05  # every row's δ spans [−ε, ε] exactly
    d = an.precision_envelope_data(z, z + 3.0 + delta)  # plus a constant shift: softmax ignores it
    assert d["eps_max"] == pytest.approx(0.05) and d["eps_mean"] == pytest.approx(0.05)  # not max |δ| ≈ 3.05
    assert d["eps_mean"] == pytest.approx(float(logit_error(z, z + 3.0 + delta).mean()))  # the one ε
    assert d["max_ratio"] <= math.expm1(0.1) / 0.1 + 1e-9
    with pytest.raises(ValueError, match="same states"):
        an.precision_envelope_data(z, z[:2])


# ----------------------------------------------------------------------------------------------------
# 03: Prop 4.3


def _naive_conditional_tail_mean(
    z: torch.Tensor, sigma: float, p_tail: float, draws: int, seed: int
) -> tuple[float, float]:
    """Sample a ~ μ explicitly and average Δ over sampled tail tokens (the definition, no weighting)."""
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(z.double(), -1)
    vals = []
    for r in range(z.shape[0]):
        noise = sigma * torch.randn(draws, z.shape[1], generator=g, dtype=torch.float64)
        lmu = torch.log_softmax(z[r].double() + noise, -1)
        a = torch.multinomial(lmu.exp(), 1, generator=g).squeeze(-1)
        d = lmu.gather(-1, a[:, None]).squeeze(-1) - lp[r][a]
        vals.append(d[lp[r][a].exp() < p_tail])
    v = torch.cat(vals)
    return float(v.mean()), float(v.std() / math.sqrt(v.numel()))


def test_positive_mode_weighting_matches_explicit_sampling() -> None:
    z = _logits(3, 24, 2.0, seed=4)
    sigma, p_tail = 0.6, 0.02
    d = an.positive_mode_data(z, sigma, num_draws=4000, seed=5, tail_p=p_tail)
    naive, se = _naive_conditional_tail_mean(z, sigma, p_tail, 20000, seed=6)
    assert d["tail_cond_mean"] == pytest.approx(naive, abs=5 * se + 0.01)
    assert d["tail_cond_mean"] > 0 > d["tail_uncond_mean"]


def test_positive_mode_agrees_with_second_order_mean_and_sits_below_the_papers_mode() -> None:
    from workbench.theory import mode_mismatch, second_order_conditional_mean

    z = _logits(4, 32, 2.5, seed=7)
    sigma = 0.2
    d = an.positive_mode_data(z, sigma, num_draws=3000, seed=8, edges=(0.0, 1e-3, 0.05, 0.5, 1.0))
    for cond, ci, second, mode, unc, unc_th, n in zip(
        d["cond"],
        d["cond_ci"],
        d["theory_second_order"],
        d["theory_mode"],
        d["uncond"],
        d["theory_uncond"],
        d["count"],
    ):
        if n == 0:
            assert math.isnan(cond)
            continue
        assert cond == pytest.approx(second, abs=ci + 2 * sigma**4)  # the Monte Carlo follows the mean ...
        assert mode >= second  # ... which sits below the paper's mode (by ½σ²(1 − Σp²))
        assert unc == pytest.approx(unc_th, abs=0.01)
    # the theory curves are the theory module's formulas, weighted by p within each bin
    p = torch.softmax(z.double(), -1)  # (4, 32)
    in_bin = (p >= 1e-3) & (p < 0.05)
    explicit_mode = sigma**2 * (
        1 - 2 * p + (p * p).sum(-1, keepdim=True)
    )  # (1 − p_a)² + Σ_{k≠a} p_k², p' = p
    assert torch.allclose(mode_mismatch(p, p, sigma), explicit_mode)
    for key, values in (
        ("theory_mode", explicit_mode),
        ("theory_second_order", second_order_conditional_mean(p, sigma)),
    ):
        assert d[key][1] == pytest.approx(float((p * values)[in_bin].sum() / p[in_bin].sum()))
    # the histogram panel marks the tail's mean and the paper's mode, the mode to the right of the mean
    assert d["tail_mode_theory"] > d["tail_cond_mean"] > 0
    assert sum(d["hist_cond"]) == pytest.approx(1.0) and sum(d["hist_uncond"]) == pytest.approx(1.0)
    assert set(d["sampled"]) == {k for k in metrics.MISMATCH_METRIC_DOCS if "lowp" in k}
    fig = ex.positive_mode_figure(d)
    assert "log π_infer − log π_train" in fig.layout.title.text  # the figure states its sign convention
    assert {a.text for a in fig.layout.annotations} >= {"mean", "paper's mode"}


def test_positive_mode_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="sigma"):
        an.positive_mode_data(_logits(2, 8, 1.0, 0), -0.1)
    with pytest.raises(ValueError, match="num_draws"):
        an.positive_mode_data(_logits(2, 8, 1.0, 0), 0.1, num_draws=2)
    with pytest.raises(ValueError, match="edges"):
        an.positive_mode_data(_logits(2, 8, 1.0, 0), 0.1, edges=(0.5, 0.1))


# ----------------------------------------------------------------------------------------------------
# 04: Theorem 4.1


def test_exact_bias_matches_the_theorem_identity_and_bounds() -> None:
    probs = (0.7, 0.2, 0.1)
    rows = an.exact_bias_vs_horizon(probs=probs, horizons=(1, 2, 3), eps=0.3, kind="tail")
    p = torch.tensor(probs, dtype=torch.float64)
    delta = torch.tensor([0.0, 0.0, 0.3], dtype=torch.float64)
    mu1 = torch.softmax(p.log() + delta, -1)
    for row in rows:
        T = int(row["T"])
        # independent recomputation: the identity E_μ[(1 − e^{−S}) g] with the analytic score Σ_t (e_{y_t} − p)
        seqs = torch.cartesian_prod(*[torch.arange(3)] * T).reshape(-1, T)
        log_pi, log_mu = p.log()[seqs].sum(-1), mu1.log()[seqs].sum(-1)
        counts = torch.nn.functional.one_hot(seqs, 3).sum(1).double()
        g = (seqs == 0).double().mean(-1)[:, None] * (counts - T * p)
        rhs = (log_mu.exp() * (1 - torch.exp(-(log_mu - log_pi))))[:, None] * g
        assert row["bias_norm"] == pytest.approx(float(rhs.sum(0).norm()), rel=1e-6)
        assert row["tv"] == pytest.approx(0.5 * float((log_mu.exp() - log_pi.exp()).abs().sum()), rel=1e-9)
        assert row["bias_norm"] <= row["bound_weight"] * (1 + 1e-9)
        assert row["bound_weight"] <= row["bound_t_delta"] * (1 + 1e-9) <= row["bound_t2"] * (1 + 1e-9)
    assert rows[0]["bias_norm"] < rows[1]["bias_norm"] < rows[2]["bias_norm"]  # it accumulates


def test_exact_bias_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="horizons"):
        an.exact_bias_vs_horizon(horizons=(3, 2))
    with pytest.raises(ValueError, match="probs"):
        an.exact_bias_vs_horizon(probs=(0.5, 0.6))
    with pytest.raises(ValueError, match="too many"):
        an.exact_bias_vs_horizon(probs=(0.25,) * 4, horizons=(12,))


def test_sequence_mismatch_vs_length_truncates_responses(tiny) -> None:
    model, tok = tiny
    s = rl.sample_policy(model, tok, "addition", num_prompts=3, n=2, seed=3)
    s.logp_train = torch.zeros_like(s.logp_train)
    s.logp_infer = torch.full_like(s.logp_infer, 0.1)
    s.mask = torch.tensor([[True, True, True, False]] * 3 + [[True, False, False, False]] * 3)[
        :, : s.mask.shape[1]
    ]
    rows = an.sequence_mismatch_vs_length(s)
    lengths = s.mask.sum(-1).double()
    for row in rows:
        expected = 0.1 * lengths.clamp(max=row["T"])  # a short response keeps its whole S
        assert row["mean_s"] == pytest.approx(float(expected.mean()))
        assert row["mean_abs_weight"] == pytest.approx(float((1 - torch.exp(-expected)).abs().mean()))
        assert row["frac_outside"] == 0.0  # e^{−0.3} ≈ 0.74 stays inside [0.5, 2]
    fig = ex.accumulation_figure(an.exact_bias_vs_horizon(horizons=(1, 2)), {"s": rows})
    assert len(fig.data) == 4 + 2


# ----------------------------------------------------------------------------------------------------
# 05: the safe vocabulary


def test_rho_sweep_matches_the_naive_references_and_props() -> None:
    z = _logits(10, 300, 5.0, seed=9)
    rhos = [1e-12, math.exp(-13), 1e-4, 1e-2, 0.3]
    rows = an.rho_sweep(z, rhos, horizon=7)
    for rho, row in zip(rhos, rows):
        zr = dvp.retained_mass_reference(z.double(), rho)
        assert row["one_minus_z_mean"] == pytest.approx(float((1 - zr).mean()), rel=1e-6, abs=1e-15)
        assert row["size_mean"] == float(dvp.safe_set_size_reference(z, rho).double().mean())
        assert row["one_minus_z_max"] <= row["bound_pruned"] * (1 + 1e-9) + 1e-15  # Prop 5.4
        assert row["bound_pruned"] <= row["bound_vocab"]
        assert row["bound_prop55"] == pytest.approx(7 * row["one_minus_z_max"])
    sizes = [r["size_mean"] for r in rows]
    assert sizes == sorted(sizes, reverse=True)  # a larger ρ keeps fewer tokens
    with pytest.raises(ValueError, match="horizon"):
        an.rho_sweep(z, rhos, horizon=0)


def test_safe_set_view_keeps_a_prefix_of_the_sorted_vocabulary() -> None:
    z = _logits(1, 100, 4.0, seed=10)[0]
    v = an.safe_set_view(z, 1e-3)
    assert bool((v["logp"][1:] <= v["logp"][:-1]).all())
    k = v["size"]
    assert bool(v["keep"][:k].all()) and not bool(v["keep"][k:].any())
    assert k == int(dvp.safe_set_size(z[None], 1e-3)[0])
    assert v["z"] == pytest.approx(float(dvp.retained_mass(z[None].double(), 1e-3)[0]))
    with pytest.raises(ValueError, match="1-D"):
        an.safe_set_view(z[None], 1e-3)


def test_tail_draws_counts_tokens_outside_the_trainers_safe_set() -> None:
    from types import SimpleNamespace

    logits = torch.tensor([[0.0, -1.0, -20.0, -30.0]]).repeat(
        2, 3, 1
    )  # (N=2, T=3, V=4); V_S at e^-5 = {0, 1}
    tokens = torch.tensor([[0, 2, 3], [1, 3, 0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])  # the last slot is padding (token 0)
    lp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    sample = an.PolicySample(SimpleNamespace(tokens=tokens), logits, lp, lp + 0.5, mask)
    t = an.tail_draws(sample, rho=math.exp(-5))
    assert t == {
        "tokens": 5.0,
        "outside": 3.0,  # tokens 2, 3 and 3 (the padded slot is not counted)
        "mean_delta_outside": pytest.approx(0.5),
        "min_gap": pytest.approx(float(lp[0, 2] - lp[0, 0])),  # token 3 against the top token 0
        "log_rho": pytest.approx(-5.0),
    }
    ones = torch.ones_like(tokens)  # token 1 everywhere: inside V_S
    lp1 = torch.log_softmax(logits, -1).gather(-1, ones[..., None]).squeeze(-1)
    inside = an.PolicySample(SimpleNamespace(tokens=ones), logits, lp1, lp1, mask)
    t_in = an.tail_draws(inside, rho=math.exp(-5))
    assert t_in["outside"] == 0.0 and math.isnan(t_in["mean_delta_outside"])
    assert t_in["min_gap"] >= t_in["log_rho"]  # nothing outside V_S ⇔ every gap ≥ log ρ
    with pytest.raises(ValueError, match="rho=None"):
        an.tail_draws(sample, rho=None)


# ----------------------------------------------------------------------------------------------------
# explorers


def _ys(fig: go.Figure) -> list[tuple]:
    """Every trace's y values (NaN as None, so equal figures compare equal)."""
    return [
        tuple(None if isinstance(v, float) and math.isnan(v) else v for v in t.y) if t.y is not None else ()
        for t in fig.data
    ]


def test_envelope_explorer_redraws_to_the_static_builders_figure() -> None:
    z = _logits(4, 60, 3.0, seed=11)
    e = ex.EnvelopeExplorer(z, eps=0.1, max_points=200)
    default = _ys(e.static_figure())
    assert _ys(e.figure) == default
    e.update(eps=0.5)
    assert _ys(e.figure) == _ys(e.figure_for(eps=0.5, kind="vertex"))
    assert _ys(e.figure) != default
    assert "0.5" in e.figure.layout.title.text
    assert _ys(e.static_figure()) == default  # the static figure stays at the defaults
    e.controls["kind"].value = "uniform"  # a control change redraws through its callback
    assert _ys(e.figure) == _ys(e.figure_for(eps=0.5, kind="uniform"))
    with pytest.raises(ValueError, match="unknown parameter"):
        e.update(sigma=1.0)
    box = e.widget()
    assert e.figure in box.children
    assert "application/vnd.jupyter.widget-view+json" in e._repr_mimebundle_()


def test_positive_mode_and_safe_set_explorers_redraw() -> None:
    z = _logits(3, 40, 3.0, seed=12)
    pm = ex.PositiveModeExplorer(z, sigma=0.3, num_draws=32)
    pm.controls["sigma"].value = 0.8
    assert _ys(pm.figure) == _ys(pm.figure_for(sigma=0.8))
    ss = ex.SafeSetExplorer(z, position=1, horizon=3)
    ss.update(rho=1e-2, position=2)
    assert _ys(ss.figure) == _ys(ss.figure_for(rho=1e-2, position=2))
    assert ss.figure.layout.shapes[0].y0 == pytest.approx(
        ss.figure_for(rho=1e-2, position=2).layout.shapes[0].y0
    )
    with pytest.raises(ValueError, match="position"):
        ex.SafeSetExplorer(z, position=3)


def test_figure_switcher_redraws_on_control_change_and_replaces_a_different_trace_set() -> None:
    import ipywidgets as widgets
    import plotly.graph_objects as go

    def make(n: int, title: str) -> go.Figure:
        return go.Figure([go.Scatter(x=[0, 1], y=[i, i + n]) for i in range(n)], layout={"title": title})

    n, title = widgets.IntSlider(value=2, min=1, max=4), widgets.Dropdown(options=["a", "b"], value="a")
    sw = ex.FigureSwitcher(make, n=n, title=title)
    assert len(sw.figure.data) == 2 and sw.figure.layout.title.text == "a"
    title.value = "b"  # same traces: updated in place
    assert sw.figure.layout.title.text == "b" and len(sw.figure.data) == 2
    n.value = 3  # three traces now: replaced
    assert [tuple(t.y) for t in sw.figure.data] == [(0, 3), (1, 4), (2, 5)]
    assert isinstance(sw.widget(), widgets.VBox) and len(sw.static_figure().data) == 2  # defaults stay static
    with pytest.raises(ValueError, match="at least one control"):
        ex.FigureSwitcher(make)
