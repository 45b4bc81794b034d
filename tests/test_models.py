"""cwa_core.models: loading the real stories260k, provenance, and failing fast and clearly."""
from __future__ import annotations

import dataclasses
import http.server
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from cwa_core import models
from cwa_core.architectures import ARCHITECTURES
from cwa_core.models import (
    LoadedModel,
    ModelInfo,
    ModelLoadError,
    load_model,
    resolve_device,
    resolve_dtype,
)
from conftest import STORIES

HUB_ID = "meta-llama/Llama-3.1-8B"


@pytest.fixture(scope="module")
def stories(assets) -> LoadedModel:
    return load_model(STORIES)


# --------------------------------------------------------------------------- the real model


def test_stories_loads_with_provenance(stories):
    info = stories.info
    assert isinstance(info, ModelInfo)
    assert info.model_id == str(STORIES)
    assert info.source == "local"
    assert info.model_type == "llama"
    assert info.n_params == 260_032
    assert info.dtype == "float32" and info.device == "cpu"  # auto on this CPU machine
    assert info.trust_remote_code is False
    assert info.revision is not None and info.revision.startswith("sha256:")
    assert len(info.revision) == len("sha256:") + 16
    int(info.revision.removeprefix("sha256:"), 16)
    assert dataclasses.is_dataclass(info)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.dtype = "bfloat16"  # type: ignore[misc]

    m = stories.model
    assert not m.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in m.parameters())
    assert sum(p.numel() for p in m.parameters()) == 260_032


def test_stories_tokenizer_and_forward(stories):
    tok = stories.tokenizer
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    assert ids.shape[1] > 1 and int(ids.max()) < 512
    with torch.no_grad():
        logits = stories.model(ids).logits
    assert logits.shape == (1, ids.shape[1], 512)
    assert torch.isfinite(logits).all()


def test_stories_hessian_vector_product(stories):
    """load_model picks fused sdpa attention; the Hutchinson metric (double backward) still
    works on it, by switching to eager attention for its duration and back afterwards."""
    from cwa_core.architectures import scored_params
    from cwa_core.metrics import ScoreOptions, score

    m = stories.model
    assert stories.info.attn_implementation == m.config._attn_implementation == "sdpa"
    refs = scored_params(m, ["mlp"])
    x = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    out = {}
    score(m, refs, "hutchinson_diag", x, lambda r, s: out.__setitem__(r.name, s), ScoreOptions(hutchinson_probes=2))
    assert len(out) == len(refs)
    assert all(torch.isfinite(s).all() for s in out.values())
    assert sum(float(s.sum()) for s in out.values()) > 0
    assert m.config._attn_implementation == "sdpa"


def test_revision_is_stable_and_tracks_content(stories, tmp_path):
    again = load_model(STORIES)
    assert again.info.revision == stories.info.revision
    assert again.info == stories.info
    assert models.local_revision(STORIES) == stories.info.revision

    # a copy has the same revision; a changed config or weight size changes it
    copy = tmp_path / "copy"
    shutil.copytree(STORIES, copy)
    for p in copy.iterdir():
        p.chmod(0o644)
    assert models.local_revision(copy) == stories.info.revision
    cfg = json.loads((copy / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-6
    (copy / "config.json").write_text(json.dumps(cfg))
    changed = models.local_revision(copy)
    assert changed != stories.info.revision
    with open(copy / "model.safetensors", "ab") as f:
        f.write(b"\0")
    assert models.local_revision(copy) != changed


def test_bf16_when_asked(assets):
    lm = load_model(STORIES, dtype="bf16")
    assert lm.info.dtype == "bfloat16"
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    alias = load_model(STORIES, dtype="bfloat16", device="cpu")
    assert alias.info.dtype == "bfloat16" and alias.info.device == "cpu"
    assert alias.info.revision == lm.info.revision


def test_path_object_and_explicit_device(assets):
    lm = load_model(Path(STORIES), dtype="fp32", device="cpu")
    assert lm.info.dtype == "float32" and lm.info.device == "cpu"


# --------------------------------------------------------------------------- the Hub, offline


def _assert_fast_hub_failure(elapsed: float, err: ModelLoadError):
    msg = str(err)
    assert elapsed < 20, f"hub failure took {elapsed:.1f}s"
    assert "local directory" in msg
    assert HUB_ID in msg
    assert "\n" not in msg


def test_hub_id_fails_fast_with_the_environment_as_is():
    t0 = time.monotonic()
    with pytest.raises(ModelLoadError) as exc:
        load_model(HUB_ID)
    _assert_fast_hub_failure(time.monotonic() - t0, exc.value)
    assert "Hugging Face Hub" in str(exc.value)


def test_hub_id_fails_fast_with_hf_hub_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(ModelLoadError) as exc:
        load_model(HUB_ID)
    _assert_fast_hub_failure(time.monotonic() - t0, exc.value)
    assert "HF_HUB_OFFLINE" in str(exc.value)


def test_hub_offline_uses_a_cached_snapshot(monkeypatch, tmp_path, assets):
    """HF_HUB_OFFLINE with the model in the Hub cache loads it, revision = the commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someorg--stories"
    snap = repo / "snapshots" / commit
    shutil.copytree(STORIES, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lm = load_model("someorg/stories")
    assert lm.info.source == "hub" and lm.info.revision == commit
    assert lm.info.model_id == "someorg/stories" and lm.info.n_params == 260_032


class _FakeHub(http.server.BaseHTTPRequestHandler):
    mode = "silent"

    def do_GET(self):  # noqa: N802
        if not self.path.startswith("/api/models/"):
            # e.g. huggingface_hub's once-a-process /api/agent-harnesses fetch (3 s timeout)
            self._send(404, {}, {})
            return
        if self.mode == "silent":
            time.sleep(5)
            return
        if self.mode == "gated":
            self._send(401, {"X-Error-Code": "GatedRepo", "X-Error-Message": "gated"}, {})
        elif self.mode == "missing":
            self._send(404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "nope"}, {})
        elif self.mode == "gated-meta":
            self._send(200, {}, {"id": HUB_ID, "sha": "a" * 40, "gated": "manual", "private": False})

    def _send(self, status, headers, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    try:
        yield _FakeHub
    finally:
        _FakeHub.mode = "silent"
        server.shutdown()
        server.server_close()


def test_hub_that_never_answers_times_out_once(fake_hub, monkeypatch):
    """No retries: a black-holed Hub costs one timeout, not minutes of backoff."""
    monkeypatch.setattr(models, "HUB_TIMEOUT_S", 0.5)
    fake_hub.mode = "silent"
    t0 = time.monotonic()
    with pytest.raises(ModelLoadError, match="offline or unreachable") as exc:
        load_model(HUB_ID)
    elapsed = time.monotonic() - t0
    assert elapsed < 2, elapsed
    _assert_fast_hub_failure(elapsed, exc.value)


def test_gated_model_mentions_hf_token(fake_hub):
    fake_hub.mode = "gated"
    with pytest.raises(ModelLoadError, match="HF_TOKEN") as exc:
        load_model(HUB_ID)
    assert "gated" in str(exc.value) and "local directory" in str(exc.value)


def test_gated_model_without_token_fails_before_downloading(fake_hub, monkeypatch):
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    fake_hub.mode = "gated-meta"
    with pytest.raises(ModelLoadError, match="gated.*HF_TOKEN"):
        load_model(HUB_ID)


def test_missing_hub_model(fake_hub):
    fake_hub.mode = "missing"
    with pytest.raises(ModelLoadError, match="not found on the Hugging Face Hub.*HF_TOKEN"):
        load_model("someorg/does-not-exist")


# --------------------------------------------------------------------------- bad local input


@pytest.mark.parametrize(
    "bad", ["./no/such/model", "/no/such/model", "~/no-such-model-dir", "a/b/c", Path("nowhere")]
)
def test_nonexistent_path(bad):
    t0 = time.monotonic()
    with pytest.raises(ModelLoadError, match="no such directory"):
        load_model(bad)
    assert time.monotonic() - t0 < 1


def test_file_instead_of_directory(assets):
    with pytest.raises(ModelLoadError, match="not a directory"):
        load_model(STORIES / "config.json")


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(tmp_path)


def test_directory_without_weights(tmp_path, assets):
    shutil.copy(STORIES / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelLoadError, match="no weight files"):
        load_model(tmp_path)


def test_unsupported_model_type_is_refused_before_the_weights(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=37).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not read")

    def boom(*a, **k):
        raise AssertionError("weights loaded before the architecture check")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", boom)
    with pytest.raises(ModelLoadError) as exc:
        load_model(tmp_path)
    msg = str(exc.value)
    assert "'bert'" in msg and "supported" in msg
    for t in ARCHITECTURES:
        assert t in msg
    assert "\n" not in msg


def test_revision_with_local_directory_is_refused(assets):
    with pytest.raises(ModelLoadError, match="Hub ids only"):
        load_model(STORIES, revision="main")


def test_cuda_requested_on_cpu_machine_is_a_load_error(assets):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        load_model(STORIES, device="cuda")


# --------------------------------------------------------------------------- dtype, device


def test_resolve_dtype():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    for name in ("bf16", "bfloat16", "BF16", "torch.bfloat16"):
        assert resolve_dtype(name) == torch.bfloat16
    for name in ("fp16", "float16", "half"):
        assert resolve_dtype(name, cpu) == torch.float16
    for name in ("fp32", "float32"):
        assert resolve_dtype(name) == torch.float32
    assert resolve_dtype(torch.bfloat16) == torch.bfloat16
    if not torch.cuda.is_available():
        assert resolve_dtype() == torch.float32
        assert resolve_dtype("auto", torch.device("cuda")) == torch.float32  # no CUDA to ask
    with pytest.raises(ValueError, match="allowed: auto, bf16, fp16, fp32"):
        resolve_dtype("int8")


def test_resolve_dtype_auto_prefers_bf16_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", torch.device("cuda:0")) == torch.float32


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device() == resolve_device("auto")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu-ish")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_resolve_device_cuda_without_cuda(name):
    with pytest.raises(ValueError, match=f"'{name}' requested but CUDA is not available"):
        resolve_device(name)


def test_model_load_error_is_one_line():
    err = ModelLoadError("first\nsecond   third")
    assert str(err) == "first second third"
    assert isinstance(err, RuntimeError)



def test_directory_without_tokenizer(tmp_path, assets):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(STORIES / name, tmp_path / name)
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_model(tmp_path)


def test_device_map_is_passed_through(assets, monkeypatch):
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    seen: dict = {}
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    lm = load_model(STORIES, device_map={"": "cpu"})
    assert seen["device_map"] == {"": "cpu"}
    assert seen["attn_implementation"] == "sdpa" and seen["trust_remote_code"] is False
    assert lm.info.device == "cpu" and not lm.model.training
    seen.clear()
    load_model(STORIES)
    assert "device_map" not in seen
