"""The /compare API through gradio_client, against the app started on the tiny model."""

import pytest
from gradio_client import Client

from .ui_server import running_app


@pytest.fixture(scope="module")
def client(tiny_dir, tiny_base, tmp_path_factory):
    with running_app(tiny_dir, tiny_base, tmp_path_factory.mktemp("app")) as url:
        yield Client(url, verbose=False)


def test_compare_returns_the_race(client, tiny_dir):
    result = client.predict("w3 w4 w5", 24, api_name="/compare")
    for key in ("plain_text", "specstream_text", "speedup", "mean_accepted", "steps", "identical"):
        assert key in result
    assert result["plain_text"] and result["plain_text"] == result["specstream_text"]  # lossless adapter
    assert result["identical"] is True
    assert result["speedup"] > 0 and result["mean_accepted"] >= 1.0
    steps = result["steps"]
    assert steps[0]["step"] == 0 and steps[0]["nodes"] == []
    assert "".join(t for s in steps for t in s["emitted_texts"]) == result["specstream_text"]
    assert sum(len(s["emitted_tokens"]) for s in steps) == 24
    assert all(n["fate"] in ("accepted", "rejected", "pruned", "unverified") for s in steps for n in s["nodes"])
    assert result["model"]["model"] == tiny_dir.name and result["model"]["adapter_mode"] == "lossless"


@pytest.mark.parametrize(
    "prompt, max_new_tokens, message",
    [
        ("", 8, "type a prompt"),
        ("w3 " * 300, 8, "context"),
        ("w3", 100_000, "at most 512"),
        ("w3", 0, "max new tokens must be 1"),
    ],
)
def test_compare_bad_input_is_a_sentence(client, prompt, max_new_tokens, message):
    with pytest.raises(Exception, match=message):
        client.predict(prompt, max_new_tokens, api_name="/compare")


def test_two_visitors_at_once_both_get_their_own_reply(client):
    jobs = [client.submit(prompt, 12, api_name="/compare") for prompt in ("w3 w4", "w9 w10 w11")]
    first, second = (job.result(timeout=120) for job in jobs)
    assert first["prompt"] == "w3 w4" and second["prompt"] == "w9 w10 w11"
    assert first["plain_text"] == first["specstream_text"] and second["plain_text"] == second["specstream_text"]
