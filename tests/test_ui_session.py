"""The app's run loop without a browser: Stop ends a run within one forward pass and keeps the partial reply."""

from types import SimpleNamespace

import pytest

from specstream.decoding import DecodeSettings
from specstream.ui import app
from specstream.ui.handlers import Session, prompt_ids
from specstream.ui.service import ModelChoice, ModelService


@pytest.fixture(scope="module")
def service(tiny_dir):
    service = ModelService(ModelChoice(str(tiny_dir), "fresh", "cpu", "float64")).start()
    assert service.wait(60) and service.ready, service.error
    return service


def test_stop_ends_the_run_within_one_pass(service, monkeypatch):
    monkeypatch.setattr(app, "UPDATE_INTERVAL", 0.0)  # a page update after every pass
    ui = SimpleNamespace(plain_stats="plain_stats", plain_text="plain_text", spec_stats="spec_stats",
                         spec_text="spec_text", verdict="verdict")
    settings = DecodeSettings(max_new_tokens=200, stop_at_eos=False)
    session = Session()
    run = app._race_live(ui, service, session, "w3", prompt_ids(service, "w3", settings), settings)
    for _ in range(4):
        next(run)
    passes_when_stopped = session.trace.plain.stats().forward_passes + session.trace.specstream.stats().forward_passes
    session.stop.set()
    assert list(run) == []
    trace = session.trace
    assert trace.stopped and not trace.finished
    assert trace.plain.stats().forward_passes + trace.specstream.stats().forward_passes == passes_when_stopped + 1
    assert trace.plain.tokens[: len(trace.specstream.tokens)] == trace.specstream.tokens[: len(trace.plain.tokens)]


def test_a_fresh_adapter_is_called_untrained(service):
    info = service.info()
    assert info["status"] == "ready" and info["adapter_mode"] == "lossless"
    assert "untrained" in info["adapter_note"]


def test_an_adapter_that_fails_to_load_is_said_plainly(tiny_dir, tmp_path):
    broken = tmp_path / "adapter"
    broken.mkdir()
    (broken / "adapter.json").write_text("{not json")
    service = ModelService(ModelChoice(str(tiny_dir), str(broken), "cpu", "float64")).start()
    assert service.wait(60) and service.ready
    assert "failed to load" in service.info()["adapter_note"]


def test_a_model_that_fails_to_load_is_said_plainly(tmp_path):
    service = ModelService(ModelChoice(str(tmp_path / "nowhere"), "default", "cpu", "float64")).start()
    assert service.wait(60) and not service.ready
    assert service.info()["status"] == "failed" and "could not be loaded" in service.error
