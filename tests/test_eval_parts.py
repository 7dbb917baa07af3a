"""The evaluation harness's parts: prompt sets (default, files, DrawBench fetched once through a
loopback dataset-viewer server, then cached), family settings, and LPIPS in plain torch checked
against torchmetrics' implementation."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from qconvert.evaluate import EvalError, lpips, prompts, settings

DRAWBENCH = [{"Prompts": f"prompt number {i}", "Category": "Counting" if i % 2 else "Colors"}
             for i in range(130)]  # fmt: skip


def test_default_prompts() -> None:
    chosen = prompts.load(None, None, Path("/nonexistent"))
    assert chosen.name == "default" and len(chosen.prompts) == 16
    categories = [p.category for p in chosen.prompts]
    assert len(set(categories)) == 8 and len(set(categories[:8])) == 8  # first 8 all differ
    assert {"text rendering", "counting", "colors", "spatial relations", "faces"} <= set(categories)
    assert [p.text for p in prompts.load("default", 3, Path("/x")).prompts] == [
        p.text for p in chosen.prompts[:3]
    ]


def test_prompt_files(tmp_path: Path) -> None:
    txt = tmp_path / "p.txt"
    txt.write_text("# my prompts\n\na red cube\n  a blue sphere  \n")
    assert [p.text for p in prompts.load(str(txt), None, tmp_path).prompts] == [
        "a red cube",
        "a blue sphere",
    ]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a", "category": "x"}\n\n{"prompt": "b"}\n')
    got = prompts.load(str(jsonl), None, tmp_path)
    assert got.name == "p.jsonl" and [(p.text, p.category) for p in got.prompts] == [
        ("a", "x"),
        ("b", ""),
    ]
    (tmp_path / "p.csv").write_text("a\n")
    with pytest.raises(EvalError, match=r"p\.csv: prompt files are \.txt"):
        prompts.load(str(tmp_path / "p.csv"), None, tmp_path)
    (tmp_path / "c.jsonl").write_text('{"prompt": "a", "category": 3}\n')
    with pytest.raises(EvalError, match=r'c\.jsonl:1: "category" must be a string'):
        prompts.load(str(tmp_path / "c.jsonl"), None, tmp_path)


class Viewer(http.server.BaseHTTPRequestHandler):
    """The Hub dataset viewer's /rows endpoint for sayakpaul/drawbench (100 rows a page)."""

    requests: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        url = urllib.parse.urlparse(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        Viewer.requests.append(self.path)
        if url.path != "/rows" or query.get("dataset") != "sayakpaul/drawbench":
            self.send_error(404)
            return
        offset, length = int(query["offset"]), int(query["length"])
        page = DRAWBENCH[offset : offset + length]
        body = json.dumps({
            "rows": [{"row_idx": offset + i, "row": r} for i, r in enumerate(page)],
            "num_rows_total": len(DRAWBENCH),
        }).encode()  # fmt: skip
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def viewer() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Viewer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_drawbench_is_fetched_once_then_cached(
    viewer: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("QCONVERT_DATASET_VIEWER", viewer)
    Viewer.requests = []
    got = prompts.load("drawbench", None, tmp_path)
    assert got.name == "drawbench" and len(got.prompts) == 130 and len(Viewer.requests) == 2
    assert got.prompts[1] == prompts.Prompt("prompt number 1", "Counting")
    assert (tmp_path / "prompts" / "drawbench.jsonl").is_file()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline from now on: the cache answers
    monkeypatch.setenv("QCONVERT_DATASET_VIEWER", "http://127.0.0.1:9")
    assert prompts.load("drawbench", 5, tmp_path).prompts == got.prompts[:5]
    assert len(Viewer.requests) == 2


def test_drawbench_unreachable_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("QCONVERT_DATASET_VIEWER", "http://127.0.0.1:9")  # nothing listens
    with pytest.raises(EvalError) as info:
        prompts.load("drawbench", None, tmp_path)
    message = str(info.value)
    assert "\n" not in message and "cannot fetch sayakpaul/drawbench from the Hub" in message
    assert "--prompts FILE" in message and not (tmp_path / "prompts").exists()


def test_settings() -> None:
    flux = settings.defaults("flux")
    assert flux.kwargs() == {"height": 1024, "width": 1024, "num_inference_steps": 28,
                             "guidance_scale": 3.5, "max_sequence_length": 512}  # fmt: skip
    assert flux.describe() == "1024×1024, 28 steps, guidance 3.5, max_sequence_length 512"
    qwen = settings.defaults("qwenimage")
    assert qwen.kwargs(4) == {"height": 1024, "width": 1024, "num_inference_steps": 50,
                              "true_cfg_scale": 4.0, "negative_prompt": " ",
                              "num_images_per_prompt": 4}  # fmt: skip
    ltx = settings.defaults("ltx2").override(steps=2, frames=9)
    assert (ltx.width, ltx.height, ltx.frames, ltx.steps) == (768, 512, 9, 2)
    assert ltx.kwargs(2)["num_videos_per_prompt"] == 2 and ltx.call["guidance_scale"] == 4.0
    from qconvert.tiny import ltx2 as tiny_ltx2

    tiny = settings.defaults("ltx2", tiny=True)
    assert tiny.call == tiny_ltx2.CALL and tiny.key() != settings.defaults("ltx2").key()
    with pytest.raises(EvalError, match="--frames 10: LTX-2 takes 8·k"):
        ltx.override(frames=10)
    with pytest.raises(EvalError, match="--width 48: LTX-2 needs a multiple of 32"):
        ltx.override(width=48)
    with pytest.raises(EvalError, match="no evaluation settings for the 'generic' family"):
        settings.defaults("generic")


def random_lpips(net: str) -> lpips.LPIPS:
    torch.manual_seed(0)
    model = lpips.LPIPS(net)
    model.load_heads(lpips.head_weights(net))
    for layer in model.features:
        if isinstance(layer, torch.nn.Conv2d):
            torch.nn.init.normal_(layer.weight, 0, 0.05)
            torch.nn.init.normal_(layer.bias, 0, 0.05)
    return model


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_equals_torchmetrics(net: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchmetrics' own LPIPS (a copy of the lpips package's code) needs torchvision only to
    build the backbone: give it ours, with the same random weights, and both must agree. This
    proves the scaling, the tapped layers, the normalization, the heads and the averaging;
    the one thing it cannot prove here is the value of torchvision's ImageNet weights."""
    import torchmetrics.functional.image.lpips as tm

    ours = random_lpips(net)
    # torchvision's `features` ends with a max-pool that LPIPS never reads.
    features = torch.nn.Sequential(*ours.features, torch.nn.MaxPool2d(2))
    monkeypatch.setattr(tm, "_get_tv_model_features", lambda name, pretrained=False: features)
    reference = tm._LPIPS(net=net, pretrained=True)
    a, b = torch.rand(3, 3, 32, 32), torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(ours(a, b), reference(a, b, normalize=True).flatten())
    assert float(ours(a, a).abs().max()) == 0
    near = (a + 0.01 * torch.randn_like(a)).clamp(0, 1)
    assert 0 < float(ours(a, near).mean()) < float(ours(a, b).mean())


def test_lpips_backbone_download_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's file layout, fetched through torch.hub (hash-checked, weights_only) from a
    file:// URL standing in for download.pytorch.org; a failing download is one line."""
    state = {f"features.{k}": v for k, v in random_lpips("alex").features.state_dict().items()}
    state["classifier.1.weight"] = torch.zeros(2, 2)  # torchvision files carry the classifier
    blob = tmp_path / "blob.pth"
    torch.save(state, blob)  # how torchvision's .pth files are made
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()[:8]
    named = blob.rename(tmp_path / f"alexnet-test-{digest}.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    spec = lpips.BACKBONES["alex"]

    def serve(url: str) -> None:
        backbone = lpips.Backbone(url, spec.channels, spec.bounds, spec.layers)
        monkeypatch.setitem(lpips.BACKBONES, "alex", backbone)

    serve(named.as_uri())
    model = lpips.load("alex")
    assert (tmp_path / "torch" / "hub" / "checkpoints" / named.name).is_file()
    a, b = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(model(a, b), random_lpips("alex")(a, b))
    serve((tmp_path / "missing-12345678.pth").as_uri())
    with pytest.raises(lpips.LpipsUnavailable) as info:
        lpips.load("alex")
    assert "\n" not in str(info.value) and "to use LPIPS offline" in str(info.value)
