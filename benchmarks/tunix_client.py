"""The CPU benchmarks' handle on the Tunix peer (``tunix_peer.py`` in ``.venv-tunix``).

:func:`open_peer` starts the peer once (``--serve``) so that its compiled step and sampler
stay warm while the benchmark alternates it with our side and transformers'; it returns the
reason instead when the environment is missing or the peer does not start.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VENV_PYTHON = ROOT / ".venv-tunix" / "bin" / "python"
PEER = Path(__file__).resolve().parent / "tunix_peer.py"


def shape_of(config) -> dict[str, Any]:
    """The fields of our ``LlamaConfig`` that the peer builds Tunix's Llama 3 from."""
    return {"vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "head_dim": config.resolved_head_dim, "rope_theta": config.rope_theta,
            "rms_norm_eps": config.rms_norm_eps,
            "tie_word_embeddings": config.tie_word_embeddings}


class TunixPeer:
    """A running peer: :meth:`request` sends one JSON request and returns its reply."""

    def __init__(self, proc: subprocess.Popen, versions: dict[str, str]):
        self.proc = proc
        self.versions = versions

    def request(self, op: str, **kwargs: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        reply = _read_json(self.proc)
        if reply is None:
            return {"op": op, "error": f"the Tunix peer exited (status {self.proc.poll()})"}
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self.request("quit")
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _read_json(proc: subprocess.Popen) -> dict[str, Any] | None:
    """The next JSON line of the peer's stdout (other lines: a library's prints, skipped)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def open_peer(config) -> TunixPeer | str:
    """The started peer for ``config``'s shape, or why there is none (a sentence)."""
    if not VENV_PYTHON.exists():
        return (f"no {VENV_PYTHON.parent.parent.name} environment: run bash "
                "benchmarks/tunix_venv.sh to compare with Tunix")
    proc = subprocess.Popen(
        [str(VENV_PYTHON), str(PEER), "--serve", "--shape", json.dumps(shape_of(config))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    ready = _read_json(proc)
    if not ready or not ready.get("ready"):
        proc.kill()
        return f"the Tunix peer did not start (status {proc.poll()}; its stderr above)"
    return TunixPeer(proc, ready["versions"])
