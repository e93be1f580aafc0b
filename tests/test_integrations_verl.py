"""verl adapter: the dvp_mis loss on verl's tensor layout, the patches, the settings and the example config.

Two layers. The loss is checked against naive formulas written here from verl's documented definitions
(``agg_loss``, PPO clip) and the workbench's, the patches against a stub package that mimics the three verl
modules they touch. Then against the real verl 0.9.1 (``make test`` installs it: the ``verl`` extra plus
``pip install --no-deps verl==0.9.1``, see the Makefile): verl's own policy-loss lookup returns our loss, the
post-import hook arms it in a fresh interpreter, the loss equals verl's PPO loss, our mismatch metrics equal
verl's rollout-correction metrics, and the config translation round-trips verl's own config objects.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from workbench import dvp, metrics
from workbench.importance import IS_METRIC_DOCS, IS_MODES, ISConfig, importance_weights
from workbench.integrations import verl as wv

EXAMPLE = Path(wv.__file__).with_name("verl_dvp_example.yaml")
RHO = math.exp(-13)


def _batch(seed: int = 0, b: int = 8, t: int = 7, k: int = 4) -> dict[str, torch.Tensor]:
    """verl layout: [B, T] tensors, right-padded responses, token-broadcast outcome advantages."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]  # (B, T)
    old = -torch.rand(b, t, generator=g) * 3  # (B, T)
    log_prob = (old + 0.05 * torch.randn(b, t, generator=g)).requires_grad_(True)
    rewards = torch.randint(0, 2, (b,), generator=g).float().view(-1, k)
    adv_seq = (rewards - rewards.mean(1, keepdim=True)).view(-1) * k / (k - 1)  # RLOO, (B,)
    return {
        "old": old,
        "log_prob": log_prob,
        "mask": mask,
        "adv_seq": adv_seq,
        "adv": adv_seq[:, None] * mask,  # (B, T), zero on padding as verl writes it
        "weights": torch.rand(b, t, generator=g) * 2,
        "rollout": old + 0.2 * torch.randn(b, t, generator=g),
    }


def _naive_ppo(log_prob, old, adv_seq, keep, weights, eps=0.2):
    """−w·min(rA, clip(r)A) per token, the PPO surrogate written out."""
    r = torch.exp(log_prob - old)
    a = adv_seq[:, None]
    per_tok = -weights * torch.minimum(r * a, r.clamp(1 - eps, 1 + eps) * a)
    return torch.where(keep, per_tok, torch.zeros_like(per_tok))


class Cfg:
    """verl's actor config as far as the loss reads it."""

    def __init__(self, **kw):
        self.clip_ratio = 0.2
        self.clip_ratio_low = None
        self.clip_ratio_high = None
        self.global_batch_info = {}
        self.__dict__.update(kw)


SETTINGS = wv.VerlDVPConfig(is_mode="token_mis", is_lo=0.5, is_hi=2.0, is_veto=None, loss_type="ppo_clip")


# ------------------------------------------------------------------------------------------------ the loss
def test_loss_token_mean_matches_naive_ppo_with_verl_weights() -> None:
    d = _batch()
    loss, stats = wv.dvp_policy_loss(
        d["old"],
        d["log_prob"],
        d["adv"],
        d["mask"].long(),
        "token-mean",
        Cfg(),
        rollout_is_weights=d["weights"],
        settings=SETTINGS,
    )
    ref = _naive_ppo(d["log_prob"], d["old"], d["adv_seq"], d["mask"], d["weights"]).sum() / d["mask"].sum()
    torch.testing.assert_close(loss, ref)
    (g,) = torch.autograd.grad(loss, d["log_prob"])
    (g_ref,) = torch.autograd.grad(ref, d["log_prob"])
    torch.testing.assert_close(g, g_ref)
    assert stats["loss/kept_tokens"] == float(d["mask"].sum())


def test_loss_seq_mean_and_pg_match_naive() -> None:
    d = _batch(seed=1)
    pg = wv.VerlDVPConfig(loss_type="pg", is_veto=None)
    loss, _ = wv.dvp_policy_loss(
        d["old"], d["log_prob"], d["adv"], d["mask"], "seq-mean-token-mean", Cfg(), settings=pg
    )
    per_tok = torch.where(d["mask"], -d["adv_seq"][:, None] * d["log_prob"], torch.zeros(()))
    ref = (per_tok.sum(-1) / d["mask"].sum(-1)).mean()  # every row has >= 1 token here
    torch.testing.assert_close(loss, ref)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_global_batch_info_reproduces_verl_agg_loss(agg: str) -> None:
    """verl ≥ 0.6: Σ loss / global count · dp_size; micro-batches then add up to the global mean."""
    d = _batch(seed=2)
    info = {"dp_size": 4, "batch_num_tokens": 123, "global_batch_size": 32}
    loss, _ = wv.dvp_policy_loss(
        d["old"],
        d["log_prob"],
        d["adv"],
        d["mask"],
        agg,
        Cfg(global_batch_info=info),
        rollout_is_weights=d["weights"],
        settings=SETTINGS,
    )
    per_tok = _naive_ppo(d["log_prob"], d["old"], d["adv_seq"], d["mask"], d["weights"])
    if agg == "token-mean":
        ref = per_tok.sum() / 123 * 4
    else:
        ref = (per_tok.sum(-1) / d["mask"].sum(-1)).sum() / 32 * 4
    torch.testing.assert_close(loss, ref)


def test_in_loss_is_path_applies_our_config_and_veto() -> None:
    """When verl passes rollout_log_probs (no weights), the ISConfig — veto included — runs in the loss."""
    d = _batch(seed=3)
    rollout = d["rollout"].clone()
    rollout[0, 0] = d["old"][0, 0] + 12.0  # ratio e^-12 < veto: sequence 0 must leave the loss
    cfg = wv.VerlDVPConfig(is_mode="token_mis", is_lo=0.5, is_hi=2.0, is_veto=1e-4)
    loss, stats = wv.dvp_policy_loss(
        d["old"],
        d["log_prob"],
        d["adv"],
        d["mask"],
        "token-mean",
        Cfg(),
        rollout_log_probs=rollout,
        settings=cfg,
    )
    res = importance_weights(d["old"], rollout, d["mask"], "token_mis", lo=0.5, hi=2.0, veto=1e-4)
    assert not res.seq_keep[0]
    ref = _naive_ppo(d["log_prob"], d["old"], d["adv_seq"], res.keep, res.weights).sum() / res.keep.sum()
    torch.testing.assert_close(loss, ref)
    (g,) = torch.autograd.grad(loss, d["log_prob"])
    assert torch.all(g[0] == 0)  # the vetoed sequence gets no gradient
    assert set(IS_METRIC_DOCS) <= set(stats)
    assert stats["mismatch/k3"] > 0


def test_loss_rejects_what_it_cannot_express() -> None:
    d = _batch(seed=4)
    gae = d["adv"] + 0.3 * torch.arange(d["adv"].shape[1])[None, :] * d["mask"]  # token-varying
    with pytest.raises(ValueError, match="adv_estimator"):
        wv.dvp_policy_loss(d["old"], d["log_prob"], gae, d["mask"], "token-mean", Cfg(), settings=SETTINGS)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        wv.dvp_policy_loss(
            d["old"], d["log_prob"], d["adv"], d["mask"], "seq-mean-token-sum-norm", Cfg(), settings=SETTINGS
        )
    with pytest.raises(ValueError, match="symmetric"):
        wv.dvp_policy_loss(
            d["old"],
            d["log_prob"],
            d["adv"],
            d["mask"],
            "token-mean",
            Cfg(clip_ratio_high=0.28),
            settings=SETTINGS,
        )


def test_sequence_advantages_reads_outcome_rows() -> None:
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    adv = torch.tensor([[0.7, 0.7, 0.0], [0.0, 0.0, 0.0]])
    assert wv.sequence_advantages(adv, mask).tolist() == pytest.approx([0.7, 0.0])


# --------------------------------------------------------------------------------------------- log-probs
def _naive_masked_logprobs(logits: torch.Tensor, labels: torch.Tensor, rho: float | None) -> torch.Tensor:
    z = logits.float()
    if rho is not None:
        keep = z >= z.amax(-1, keepdim=True) + math.log(rho)
        z = torch.where(keep, z, torch.full_like(z, -1e9))
    return torch.log_softmax(z, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("shape", [(3, 5, 40), (11, 40)])  # padded [B, T, V] and remove-padding [nnz, V]
@pytest.mark.parametrize("rho", [None, 1e-2])
def test_dvp_logprobs_from_logits_on_verl_layouts(shape: tuple[int, ...], rho: float | None) -> None:
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(*shape, generator=g) * 4
    labels = logits.argmax(-1)  # always inside the safe set
    fn = wv.dvp_logprobs_from_logits(rho, chunk_size=4)
    got = fn(logits=logits, labels=labels, inplace_backward=True)
    torch.testing.assert_close(got, _naive_masked_logprobs(logits, labels, rho))
    plain = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if rho is None:
        torch.testing.assert_close(got, plain)
    else:  # renormalised over the safe set: log π^mp = log π − log Z ≥ log π, equality iff nothing pruned
        logz = dvp.retained_mass(logits, rho).log()
        torch.testing.assert_close(got, plain - logz)
        assert bool((logz < 0).any())


# ------------------------------------------------------------------------------------- settings and maps
def test_with_min_p() -> None:
    assert wv.with_min_p({"top_p": 1.0}, 1e-4) == {"top_p": 1.0, "min_p": 1e-4}
    assert wv.with_min_p({"min_p": 1e-4}, 1e-4)["min_p"] == 1e-4
    assert wv.with_min_p({"min_p": 0.0}, None) == {"min_p": 0.0}
    with pytest.raises(ValueError, match="min_p"):
        wv.with_min_p({"min_p": 0.05}, 1e-4)


@pytest.mark.parametrize(
    "cfg",
    [
        ISConfig("none", veto=None),
        ISConfig("token_tis", hi=3.0, veto=None),
        ISConfig("seq_tis", hi=5.0, veto=None),
        ISConfig("token_mis", lo=0.5, hi=2.0, veto=None),
        ISConfig("token_mis", lo=0.25, hi=2.0, veto=None),
        ISConfig("seq_mis", lo=0.5, hi=2.0, veto=None),
        ISConfig("geo_mask", lo=0.999, hi=1.001, veto=None),
    ],
)
def test_rollout_correction_round_trips_through_is_config_from_verl(cfg: ISConfig) -> None:
    verl_keys = wv.rollout_correction_for(cfg)
    back = wv.is_config_from_verl({"rollout_correction": verl_keys})
    assert back.mode == cfg.mode
    for got, want in zip(back.bounds, cfg.bounds):
        assert (got is None and want is None) or got == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize(
    "cfg",
    [
        ISConfig("none", veto=None, trust_region=0.5),
        ISConfig("token_tis", hi=2.0, veto=None, trust_region=0.1, trust_region_div="k2"),
        ISConfig("geo_mask", lo=0.99, hi=1.01, veto=None, trust_region=0.5),
    ],
)
def test_trust_region_round_trips_through_verl_keys(cfg: ISConfig) -> None:
    verl_keys = wv.rollout_correction_for(cfg)
    assert f"seq_max_{cfg.trust_region_div}" in verl_keys["rollout_rs"]
    back = wv.is_config_from_verl({"rollout_correction": verl_keys})
    assert (back.mode, back.trust_region, back.trust_region_div) == (
        cfg.mode,
        cfg.trust_region,
        cfg.trust_region_div,
    )
    for got, want in zip(back.bounds, cfg.bounds):
        assert (got is None and want is None) or got == pytest.approx(want, rel=1e-12)


def test_trust_region_keys_that_cannot_be_read() -> None:
    with pytest.raises(ValueError, match="one trust-region option"):
        wv.is_config_from_verl({"rollout_rs": "seq_max_k2,seq_max_k3", "rollout_rs_threshold": 0.1})
    with pytest.raises(ValueError, match="one upper bound"):
        wv.is_config_from_verl({"rollout_rs": "seq_max_k3", "rollout_rs_threshold": "0.1_0.5"})
    with pytest.raises(ValueError, match="thresholds"):
        wv.is_config_from_verl({"rollout_rs": "seq_max_k3,seq_mean_k1", "rollout_rs_threshold": "1,2,3"})


def test_rollout_correction_refuses_what_verl_lacks() -> None:
    with pytest.raises(ValueError, match="veto"):
        wv.rollout_correction_for(ISConfig("token_mis", lo=0.5, hi=2.0, veto=1e-4))
    with pytest.raises(ValueError, match="seq_is"):
        wv.rollout_correction_for(ISConfig("seq_is", veto=None))


# ------------------------------------------------------------------- verl rollout_correction → ISConfig
@pytest.mark.parametrize(
    ("verl", "expected"),
    [
        # 2025-10 flat keys under `algorithm`
        (
            {
                "rollout_is": True,
                "rollout_is_threshold": 2.0,
                "rollout_is_level": "token",
                "rollout_is_mode": "truncate",
                "rollout_is_veto_threshold": 1e-4,
            },
            ISConfig("token_tis", None, 2.0, 1e-4),
        ),
        (
            {
                "rollout_is": True,
                "rollout_is_threshold": 5.0,
                "rollout_is_threshold_lower": 0.8,
                "rollout_is_mode": "mask",
            },
            ISConfig("token_mis", 0.8, 5.0, None),
        ),
        (
            {
                "rollout_is": True,
                "rollout_is_threshold": 4.0,
                "rollout_is_level": "sequence",
                "rollout_is_mode": "clip",
            },
            ISConfig("seq_mis", 0.25, 4.0, None),
        ),
        (
            {
                "rollout_is": True,
                "rollout_is_threshold": 1.0002,
                "rollout_is_threshold_lower": 0.9998,
                "rollout_is_level": "geometric",
                "rollout_is_mode": "mask",
                "rollout_is_veto_threshold": 1e-4,
            },
            ISConfig("geo_mask", 0.9998, 1.0002, 1e-4),
        ),
        (
            {
                "rollout_is": True,
                "rollout_is_threshold": 5.0,
                "rollout_is_level": "sequence",
                "rollout_is_threshold_lower": 0.0,
            },
            ISConfig("seq_tis", None, 5.0, None),  # truncation ignores the lower bound
        ),
        ({"rollout_is": False, "rollout_is_threshold": 2.0}, ISConfig("none", veto=None)),  # metrics only
        ({"rollout_is": True, "rollout_is_threshold": None}, ISConfig("none", veto=None)),  # null disables
        (
            {"rollout_is": True, "rollout_is_threshold": 2.0, "rollout_is_veto_threshold": 0},
            ISConfig("token_tis", hi=2.0, veto=None),
        ),
        # 2025-11 `rollout_correction` section
        (
            {
                "rollout_correction": {
                    "rollout_is": "sequence",
                    "rollout_is_threshold": 3.0,
                    "rollout_token_veto_threshold": 1e-4,
                }
            },
            ISConfig("seq_tis", None, 3.0, 1e-4),
        ),
        (
            {
                "rollout_is": None,
                "rollout_rs": "geometric",
                "rollout_rs_threshold": 1.01,
                "rollout_rs_threshold_lower": 0.99,
            },
            ISConfig("geo_mask", 0.99, 1.01, None),
        ),
        (
            {
                "rollout_is": "token",
                "rollout_is_threshold": 2.0,
                "rollout_rs": "token",
                "rollout_rs_threshold": 2.0,
            },
            ISConfig("token_mis", 0.5, 2.0, None),
        ),
        # newer: "lo_hi" strings and k1 filters (k1 bounds are on μ/π: "a_b" → π/μ ∈ [1/b, 1/a])
        ({"rollout_is": "token", "rollout_is_threshold": "0.5_5.0"}, ISConfig("token_mis", 0.5, 5.0, None)),
        ({"rollout_is": "sequence", "rollout_is_threshold": "2.5"}, ISConfig("seq_tis", None, 2.5, None)),
        (
            {"rollout_rs": "seq_mean_k1", "rollout_rs_threshold": "0.8_1.25"},
            ISConfig("geo_mask", 0.8, 1.25, None),
        ),
        (
            {"rollout_rs": "seq_mean_k1", "rollout_rs_threshold": "0.5_1.0"},
            ISConfig("geo_mask", 1.0, 2.0, None),
        ),
        (
            {"algorithm": {"gamma": 1.0, "adv_estimator": "rloo", "rollout_correction": None}},
            ISConfig("none", veto=None),
        ),
    ],
)
def test_is_config_from_verl_mappings(verl: dict, expected: ISConfig) -> None:
    assert wv.is_config_from_verl(verl) == expected
    assert wv.is_config_from_verl({"algorithm": verl} if "algorithm" not in verl else verl) == expected


def test_is_config_from_verl_presets() -> None:
    geo = wv.is_config_from_verl("decoupled_geo_rs")
    assert geo.mode == "geo_mask"
    assert geo.lo == pytest.approx(1 / 1.001) and geo.hi == pytest.approx(1 / 0.999)
    assert wv.is_config_from_verl("decoupled_seq_is_rs") == ISConfig("seq_mis", 0.5, 2.0, None)
    assert wv.is_config_from_verl("decoupled_token_icepop") == ISConfig("token_mis", 0.5, 5.0, None)
    assert wv.is_config_from_verl("bypass_ppo_clip").mode == "none"
    for name in wv.VERL_PRESETS:  # every listed preset resolves
        assert wv.is_config_from_verl(name).mode in IS_MODES
    assert wv.is_config_from_verl("decoupled_token_is", log_clamp=10.0).log_clamp == 10.0


@pytest.mark.parametrize(
    ("verl", "match"),
    [
        ("decoupled_geo_rs_seq_tis", r"no single-mode equivalent"),
        ({"rollout_is_treshold": 2.0}, r"unknown verl rollout-correction key\(s\) \['rollout_is_treshold'\]"),
        ({"algorithm": {"gamma": 1.0, "rollout_is_levle": "token"}}, r"rollout_is_levle"),
        (
            {"rollout_is": "sequence", "rollout_rs": "seq_mean_k1", "rollout_rs_threshold": "0.999_1.001"},
            r"not one mode",
        ),
        ({"rollout_rs": "token", "rollout_rs_threshold": 2.0}, r"without IS weights"),
        ({"rollout_rs": "seq_mean_k3", "rollout_rs_threshold": 0.01}, r"k2/k3"),
        ({"rollout_rs": "geometric"}, r"needs rollout_rs_threshold"),
        ({"rollout_is": True, "rollout_is_mode": "clamp"}, r"rollout_is_mode='clamp'"),
        ({"rollout_is": True, "rollout_is_level": "geometric"}, r"geometric.*truncate"),
        ({"rollout_is": "token", "rollout_is_batch_normalize": True}, r"batch_normalize"),
        ({"rollout_is": "token", "rollout_is_threshold": "abc"}, r"rollout_is_threshold='abc'"),
        ({"rollout_is": "token", "rollout_is_threshold": 0.5}, r"hi=0.5"),
        (
            {"rollout_is": "token", "rollout_is_veto_threshold": 1e-4, "rollout_token_veto_threshold": 1e-3},
            r"conflicting",
        ),
        ({"rollout_is": "token", "rollout_is_veto_threshold": 2.0}, r"veto=2.0"),
        ({"rollout_is": "tokens"}, r"level 'tokens'"),
    ],
)
def test_is_config_from_verl_rejects_what_it_cannot_express(verl: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        wv.is_config_from_verl(verl)  # type: ignore[arg-type]


def test_is_config_from_verl_geo_preset_behaves_like_verl_k1_filter() -> None:
    """verl's seq_mean_k1 keeps a sequence iff mean(log μ − log π) ∈ [log a, log b]; check on random data."""
    g = torch.Generator().manual_seed(7)
    lt = -torch.rand(64, 8, generator=g) * 4.0
    li = lt + 0.02 * torch.randn(64, 8, generator=g)
    mask = torch.arange(8)[None, :] < torch.randint(0, 9, (64, 1), generator=g)  # ragged, some rows empty
    a, b = 0.995, 1.002  # asymmetric so that the μ/π → π/μ inversion matters
    res = wv.is_config_from_verl({"rollout_rs": "seq_mean_k1", "rollout_rs_threshold": f"{a}_{b}"}).apply(
        lt, li, mask
    )
    k1 = torch.where(mask, li - lt, 0.0).sum(-1) / mask.sum(-1).clamp_min(1)
    verl_keep = (k1 >= math.log(a)) & (k1 <= math.log(b))
    has = mask.any(-1)
    assert torch.equal(res.seq_keep[has], verl_keep[has])
    assert 0 < int(verl_keep[has].sum()) < int(has.sum())  # the window is neither empty nor everything


def test_settings_json_env_and_errors() -> None:
    cfg = wv.VerlDVPConfig(rho=1e-3, is_mode="seq_tis", is_lo=None, is_hi=4.0, loss_type="pg")
    assert wv.VerlDVPConfig.from_json(cfg.to_json()) == cfg
    assert wv.VerlDVPConfig.from_env(cfg.env()) == cfg
    assert wv.VerlDVPConfig.from_env({}) == wv.VerlDVPConfig()
    assert cfg.env()["VERL_USE_EXTERNAL_MODULES"] == wv.PLUGIN_MODULE
    with pytest.raises(ValueError, match="not valid JSON"):
        wv.VerlDVPConfig.from_json("{rho: 1")
    with pytest.raises(ValueError, match="unknown"):
        wv.VerlDVPConfig.from_json('{"rhoo": 0.1}')
    with pytest.raises(ValueError, match="rho"):
        wv.VerlDVPConfig(rho=2.0)
    with pytest.raises(ValueError, match="loss_type"):
        wv.VerlDVPConfig(loss_type="gspo")


# ------------------------------------------------------------------------------------------ import hooks
def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A sys.path entry for stub packages; their modules and our hooks are removed afterwards. A real verl that
    an earlier test imported is hidden meanwhile (and restored), so the stubs are what ``import verl`` finds."""
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "verl" or m.startswith("verl.")]:
        monkeypatch.delitem(sys.modules, name)
    before = set(sys.modules)
    yield tmp_path
    wv.uninstall()
    for name in set(sys.modules) - before:
        del sys.modules[name]


def test_after_import_runs_before_importers_bind(sandbox: Path) -> None:
    _write(
        sandbox,
        {
            "wbfake/__init__.py": "",
            "wbfake/lib.py": "def f():\n    return 'original'\n",
            "wbfake/user.py": "from wbfake.lib import f\n",
        },
    )
    seen = []

    def patch(module):
        seen.append(module.__name__)
        module.f = lambda: "patched"

    wv.after_import("wbfake.lib", patch)
    import wbfake.user  # imports wbfake.lib first, then binds f

    assert seen == ["wbfake.lib"]
    assert wbfake.user.f() == "patched"
    wv.after_import("wbfake.lib", lambda m: seen.append("again"))  # already imported: runs now
    assert seen == ["wbfake.lib", "again"]


STUB_VERL = {
    "verl/__init__.py": "",
    "verl/utils/__init__.py": "",
    "verl/utils/torch_functional.py": """
        import torch
        def logprobs_from_logits(logits, labels, inplace_backward=True):
            return torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    """,
    "verl/workers/__init__.py": "",
    "verl/workers/actor/__init__.py": "",
    "verl/workers/actor/dp_actor.py": "from verl.utils.torch_functional import logprobs_from_logits\n",
    "verl/workers/rollout/__init__.py": "",
    "verl/workers/rollout/vllm_rollout/__init__.py": "",
    "verl/workers/rollout/vllm_rollout/vllm_async_server.py": """
        class vLLMHttpServerBase:
            async def generate(self, prompt_ids, sampling_params, request_id, image_data=None):
                return dict(sampling_params)
        class vLLMHttpServer(vLLMHttpServerBase):
            pass
    """,
    "verl/trainer/__init__.py": "",
    "verl/trainer/ppo/__init__.py": "",
    "verl/trainer/ppo/core_algos.py": """
        POLICY_LOSS_REGISTRY = {}
        def register_policy_loss(name):
            def decorator(func):
                POLICY_LOSS_REGISTRY[name] = func
                return func
            return decorator
        def get_policy_loss_fn(name):
            return POLICY_LOSS_REGISTRY[name]
    """,
    "early_user.py": "from verl.utils.torch_functional import logprobs_from_logits\n",
}


def test_install_patches_a_stub_verl_lazily(sandbox: Path) -> None:
    """Against stubs of the three verl modules: registration, log-prob patch (early and late importers), min-p."""
    import asyncio

    _write(sandbox, STUB_VERL)
    import early_user  # bound the original before install: must be rebound

    original = early_user.logprobs_from_logits
    cfg = wv.VerlDVPConfig(rho=0.05)
    wv.install(cfg)  # torch_functional is already imported -> patched now; the rest when imported
    assert wv.active_config() == cfg
    import verl.trainer.ppo.core_algos as core_algos
    import verl.utils.torch_functional as tf
    import verl.workers.actor.dp_actor as dp_actor
    import verl.workers.rollout.vllm_rollout.vllm_async_server as server

    assert core_algos.get_policy_loss_fn(wv.LOSS_MODE) is wv.dvp_policy_loss
    logits = torch.tensor([[0.0, -1.0, -5.0], [2.0, 0.0, -9.0]])
    labels = torch.tensor([1, 0])
    expected = _naive_masked_logprobs(logits, labels, 0.05)
    for fn in (tf.logprobs_from_logits, dp_actor.logprobs_from_logits, early_user.logprobs_from_logits):
        torch.testing.assert_close(fn(logits, labels, inplace_backward=False), expected)
    out = asyncio.run(server.vLLMHttpServer().generate([1, 2], {"temperature": 1.0}, "req-0"))
    assert out == {"temperature": 1.0, "min_p": 0.05}

    wv.uninstall()
    assert early_user.logprobs_from_logits is original
    assert asyncio.run(server.vLLMHttpServer().generate([1], {}, "r")) == {}


def test_plugin_module_installs_from_env(sandbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = wv.VerlDVPConfig(rho=1e-3, is_veto=None)
    monkeypatch.setenv(wv.ENV_VAR, cfg.to_json())
    import workbench.integrations.verl_plugin as plugin

    assert plugin.SETTINGS == cfg == wv.active_config()


# ------------------------------------------------------------------------------------------- real verl 0.9.1
def _verl_module(name: str):
    return pytest.importorskip(
        name, reason="verl is not installed; `make test` installs it (see the Makefile)"
    )


VERL_METRIC_MAP: dict[str, str] = {
    "rollout_corr/kl": "mismatch/k1",
    "rollout_corr/k3_kl": "mismatch/k3",
    "rollout_corr/chi2_token": "mismatch/chi2_token",
    "rollout_corr/chi2_seq": "mismatch/chi2_seq",
    "rollout_corr/rollout_rs_seq_max_k3_seq_masked_fraction": "is/frac_trust_region",
}
"""verl rollout-correction metric → the workbench metric with the same definition (rows without empty
responses; ``rollout_corr/log_ppl_diff`` is ``log mismatch/ppl_ratio``, checked separately)."""


def test_post_import_hook_registers_the_loss_in_real_verl() -> None:
    """A fresh interpreter, as in a Ray worker: VERL_USE_EXTERNAL_MODULES makes `import verl` import our plugin;
    its post-import hooks register dvp_mis when verl imports core_algos and patch logprobs_from_logits, also
    for modules that bind it later with `from … import` (verl's naive rollout)."""
    _verl_module("verl")
    code = textwrap.dedent(
        """
        import json, sys
        import verl
        import workbench.integrations.verl as wv
        before = "verl.trainer.ppo.core_algos" in sys.modules
        from verl.trainer.ppo import core_algos
        from verl.workers.rollout.naive import naive_rollout
        import verl.utils.torch_functional as tf
        print(json.dumps({
            "core_algos_imported_before": before,
            "registered": core_algos.get_policy_loss_fn(wv.LOSS_MODE) is wv.dvp_policy_loss,
            "patched": getattr(tf.logprobs_from_logits, "_workbench_dvp", False),
            "bound": naive_rollout.logprobs_from_logits is tf.logprobs_from_logits,
            "rho": wv.active_config().rho,
        }))
        """
    )
    env = {**__import__("os").environ, **wv.VerlDVPConfig(rho=0.05, is_veto=None).env()}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    got = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    assert got == {
        "core_algos_imported_before": False,
        "registered": True,
        "patched": True,
        "bound": True,
        "rho": 0.05,
    }


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_loss_from_verls_lookup_equals_verls_ppo_loss(agg: str) -> None:
    """The function verl's get_policy_loss_fn("dvp_mis") returns, called as verl's losses.py calls it, equals
    verl's own vanilla PPO loss with the same IS weights (dual-clip off: PARITY.md), values and gradients."""
    core_algos = _verl_module("verl.trainer.ppo.core_algos")
    omegaconf = _verl_module("omegaconf")
    d = _batch(seed=6)
    cfg = omegaconf.OmegaConf.create(
        {
            "clip_ratio": 0.2,
            "clip_ratio_low": 0.2,
            "clip_ratio_high": 0.2,
            "clip_ratio_c": 1e9,
            "global_batch_info": {},
        }
    )
    kwargs = dict(
        old_log_prob=d["old"],
        advantages=d["adv"],
        response_mask=d["mask"],
        loss_agg_mode=agg,
        config=cfg,
        rollout_is_weights=d["weights"],
    )
    try:
        wv.install(SETTINGS)
        ours_fn = core_algos.get_policy_loss_fn(wv.LOSS_MODE)
        assert ours_fn is wv.dvp_policy_loss
        ours, stats = ours_fn(log_prob=d["log_prob"], **kwargs)
    finally:
        wv.uninstall()
    theirs, _ = core_algos.get_policy_loss_fn("vanilla")(log_prob=d["log_prob"], **kwargs)
    torch.testing.assert_close(ours, theirs)
    (g,) = torch.autograd.grad(ours, d["log_prob"])
    (g_ref,) = torch.autograd.grad(theirs, d["log_prob"])
    torch.testing.assert_close(g, g_ref)
    assert stats["dvp/boundary_tokens"] == 0.0


def test_mismatch_metrics_and_trust_region_agree_with_verls_rollout_correction() -> None:
    rc = _verl_module("verl.trainer.ppo.rollout_corr_helper")
    g = torch.Generator().manual_seed(8)
    b, t = 32, 9
    mask = torch.arange(t)[None, :] < torch.randint(1, t + 1, (b, 1), generator=g)  # no empty row
    old = -torch.rand(b, t, generator=g) * 3
    rollout = old + 0.3 * torch.randn(b, t, generator=g)
    keys = {
        "rollout_is": "token",
        "rollout_is_threshold": 2.0,
        "rollout_rs": "seq_max_k3",
        "rollout_rs_threshold": 0.3,
    }
    weights, verl_mask, verl_metrics = rc.compute_rollout_correction_and_rejection_mask(
        old, rollout, mask.float(), **keys
    )
    cfg = wv.is_config_from_verl({"rollout_correction": keys})
    assert (cfg.mode, cfg.hi, cfg.trust_region, cfg.trust_region_div) == ("token_tis", 2.0, 0.3, "k3")
    res = cfg.apply(old, rollout, mask)
    ours = {**res.stats, **metrics.mismatch_metrics(old, rollout, mask)}
    assert 0 < ours["is/frac_trust_region"] < 1  # the rule rejects some sequences, not all
    for theirs_key, our_key in VERL_METRIC_MAP.items():
        assert ours[our_key] == pytest.approx(verl_metrics[theirs_key], rel=1e-5, abs=1e-7), our_key
    assert math.log(ours["mismatch/ppl_ratio"]) == pytest.approx(
        verl_metrics["rollout_corr/log_ppl_diff"], rel=1e-5
    )
    assert torch.equal(verl_mask.bool(), res.keep)
    torch.testing.assert_close(weights.batch["rollout_is_weights"] * verl_mask, res.weights)


@pytest.mark.parametrize(
    "cfg",
    [
        ISConfig("none", veto=None),
        ISConfig("token_tis", hi=3.0, veto=None, trust_region=0.2),
        ISConfig("seq_tis", hi=5.0, veto=None),
        ISConfig("token_mis", lo=0.5, hi=2.0, veto=None),
        ISConfig("seq_mis", lo=0.5, hi=2.0, veto=None, trust_region=0.1, trust_region_div="k2"),
        ISConfig("geo_mask", lo=0.95, hi=1.05, veto=None, trust_region=0.3),
    ],
)
def test_translation_round_trips_real_verl_configs(cfg: ISConfig) -> None:
    """ISConfig → our verl keys → verl's own RolloutCorrectionConfig → back, and verl's helper on those keys
    keeps and weights exactly the tokens our ISConfig does."""
    rc = _verl_module("verl.trainer.ppo.rollout_corr_helper")
    algorithm = _verl_module("verl.trainer.config.algorithm")
    verl_cfg = algorithm.RolloutCorrectionConfig(**wv.rollout_correction_for(cfg))
    back = wv.is_config_from_verl({"rollout_correction": verl_cfg})
    assert (back.mode, back.veto, back.trust_region, back.trust_region_div) == (
        cfg.mode,
        cfg.veto,
        cfg.trust_region,
        cfg.trust_region_div,
    )
    for got, want in zip(back.bounds, cfg.bounds):
        assert (got is None and want is None) or got == pytest.approx(want, rel=1e-12)
    g = torch.Generator().manual_seed(9)
    mask = torch.arange(6)[None, :] < torch.randint(1, 7, (40, 1), generator=g)
    old = -torch.rand(40, 6, generator=g) * 3
    rollout = old + 0.1 * torch.randn(40, 6, generator=g)
    weights, keep, _ = rc.compute_rollout_correction_and_rejection_mask(
        old,
        rollout,
        mask.float(),
        rollout_is=verl_cfg.rollout_is,
        rollout_is_threshold=verl_cfg.rollout_is_threshold,
        rollout_rs=verl_cfg.rollout_rs,
        rollout_rs_threshold=verl_cfg.rollout_rs_threshold,
    )
    res = cfg.apply(old, rollout, mask)
    w = weights.batch["rollout_is_weights"] if weights is not None else torch.ones_like(old)
    effective = w * keep  # verl: weight × mask; IcePop's zero weights stay in its mask
    torch.testing.assert_close(effective, res.weights, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "preset",
    ["disabled", "decoupled_token_is", "decoupled_seq_is", "decoupled_seq_is_rs", "decoupled_geo_rs"],
)
def test_reads_verls_own_preset_objects(preset: str) -> None:
    algorithm = _verl_module("verl.trainer.config.algorithm")
    verl_cfg = getattr(algorithm.RolloutCorrectionConfig, preset)()
    assert wv.is_config_from_verl({"rollout_correction": verl_cfg}) == wv.is_config_from_verl(preset)


# ------------------------------------------------------------------------------------- example config
def _example() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(EXAMPLE.read_text())


def test_example_config_is_consistent() -> None:
    cfg = _example()
    settings = wv.check_verl_config(cfg)
    assert settings.rho == RHO
    rc = cfg["algorithm"]["rollout_correction"]
    assert {k: rc[k] for k in wv.rollout_correction_for(settings.is_config())} == wv.rollout_correction_for(
        settings.is_config()
    )


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        ("actor_rollout_ref.model.use_fused_kernels", True, "use_fused_kernels"),
        ("algorithm.rollout_correction.bypass_mode", True, "bypass_mode"),
        ("algorithm.adv_estimator", "gae", "adv_estimator"),
        ("actor_rollout_ref.rollout.top_p", 0.9, "top_p"),
        ("actor_rollout_ref.rollout.logprobs_mode", "raw_logprobs", "logprobs_mode"),
        ("actor_rollout_ref.rollout.logprobs_mode", None, "logprobs_mode is unset"),
        ("actor_rollout_ref.actor.policy_loss.loss_mode", "vanilla", "loss_mode"),
        ("actor_rollout_ref.actor.strategy", "megatron", "strategy"),
        ("algorithm.rollout_correction.rollout_is_threshold", "0.8_1.25", "rollout_correction"),
        (
            "ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES",
            "other.module",
            "VERL_USE_EXTERNAL",
        ),
    ],
)
def test_check_verl_config_names_each_problem(path: str, value: object, named: str) -> None:
    cfg = _example()
    node = cfg
    *parents, leaf = path.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError, match=named):
        wv.check_verl_config(cfg)


# ------------------------------------------------------------------------------------ lazy framework import
def test_package_imports_without_trl_or_verl() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["trl"] = None   # makes `import trl` fail like a missing install
        sys.modules["verl"] = None
        import workbench.integrations as wi
        import workbench.integrations.verl as wv
        assert "trl" not in {m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}
        try:
            wi.DVPGRPOTrainer
        except ImportError as e:
            assert "pip install" in str(e), e
        else:
            raise AssertionError("DVPGRPOTrainer imported without TRL")
        assert wi.dvp_policy_loss is wv.dvp_policy_loss
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
