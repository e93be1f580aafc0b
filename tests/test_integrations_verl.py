"""verl adapter: the dvp_mis loss on verl's tensor layout, the patches, the settings and the example config.

verl itself is not needed: the loss is checked against naive formulas written here from verl's documented
definitions (``agg_loss``, PPO clip) and the workbench's, the patches against a stub package that mimics the
three verl modules they touch. The registry test runs only where verl is installed.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from workbench import dvp
from workbench.importance import IS_METRIC_DOCS, ISConfig, importance_weights
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
            d["old"], d["log_prob"], d["adv"], d["mask"], "seq-mean-token-sum", Cfg(), settings=SETTINGS
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
def test_rollout_correction_round_trips_through_from_verl(cfg: ISConfig) -> None:
    verl_keys = wv.rollout_correction_for(cfg)
    back = ISConfig.from_verl({"rollout_correction": verl_keys})
    assert back.mode == cfg.mode
    for got, want in zip(back.bounds, cfg.bounds):
        assert (got is None and want is None) or got == pytest.approx(want, rel=1e-12)


def test_rollout_correction_refuses_what_verl_lacks() -> None:
    with pytest.raises(ValueError, match="veto"):
        wv.rollout_correction_for(ISConfig("token_mis", lo=0.5, hi=2.0, veto=1e-4))
    with pytest.raises(ValueError, match="seq_is"):
        wv.rollout_correction_for(ISConfig("seq_is", veto=None))


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
    """A sys.path entry for stub packages; their modules and our hooks are removed afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
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


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("verl") is None,
    reason="verl is not installed (pip install verl pulls Ray, vLLM and CUDA packages; not in the CPU env)",
)
def test_registers_in_real_verl_registry() -> None:
    import inspect

    from verl.trainer.ppo import core_algos

    try:
        wv.install(wv.VerlDVPConfig(is_veto=None))
        assert core_algos.get_policy_loss_fn(wv.LOSS_MODE) is wv.dvp_policy_loss
        ours = inspect.signature(wv.dvp_policy_loss).parameters
        vanilla = inspect.signature(core_algos.get_policy_loss_fn("vanilla")).parameters
        assert set(vanilla) <= set(ours) | {"kwargs"}, "verl passes an argument our loss does not accept"
    finally:
        wv.uninstall()


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
