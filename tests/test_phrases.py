"""The phrase table: longest-key continuations of the model's own replies, stored as safetensors."""

import pytest

from specstream.adapter import save_adapter
from specstream.engine import build_model
from specstream.phrases import PHRASES_FILE, PhraseError, PhraseTable

from .conftest import random_adapter

REPLIES = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6], [9, 2, 3, 7, 8], [9, 2, 3, 7, 8], [0, 0, 0]]


def test_longest_key_wins_and_rare_phrases_are_dropped():
    table = PhraseTable.build(REPLIES, min_count=2)
    assert table.continuation([0, 1, 2, 3], 8) == ([4, 5, 6], 3)  # "1 2 3" -> its own reply
    assert table.continuation([0, 9, 2, 3], 8) == ([7, 8], 3)  # "9 2 3" -> the other one
    assert table.continuation([5, 5, 2, 3], 2)[1] == 2  # only "2 3" is known; cut to the length asked
    assert table.continuation([0, 0, 77], 8) == ([], 0)
    assert table.continuation([0, 0], 8) == ([], 0)  # "0 0 0" was seen once only
    assert PhraseTable.build(REPLIES, min_count=1).continuation([0, 0], 8)[0] == [0]


def test_next_tokens_are_shares_after_the_longest_known_key():
    table = PhraseTable.build(REPLIES, min_count=2)
    assert table.next_tokens([0, 1, 2, 3]) == {4: 1.0}  # "1 2 3" was followed by 4 both times
    assert table.next_tokens([5, 5, 2, 3]) == {4: 0.5, 7: 0.5}  # only "2 3" is known: 4 twice, 7 twice
    assert table.next_tokens([5, 5, 77]) == {}
    assert table.next_tokens([7, 0, 0]) == {0: 1.0}  # "0 0" seen once only: "0" answers (0 after it twice)


def test_only_the_most_seen_keys_are_kept(monkeypatch):
    from specstream import phrases
    monkeypatch.setattr(phrases, "MAX_FOLLOWER_KEYS", 2)
    monkeypatch.setattr(phrases, "MAX_PHRASES", 3)
    table = PhraseTable.build(REPLIES, min_count=2)
    assert set(table.followers) == {(2,), (3,)}  # "2", "3" and "2 3" seen 4 times, first seen first; the rest twice
    assert len(table.table) <= 3


def test_saved_table_round_trips_and_bad_files_fail_clearly(tmp_path):
    table = PhraseTable.build(REPLIES, min_count=2)
    table.save(tmp_path)
    loaded = PhraseTable.load(tmp_path, vocab_size=10)
    assert loaded.table == table.table and len(loaded) == len(table)
    assert loaded.followers.keys() == table.followers.keys()
    assert all(abs(loaded.followers[k][t] - p) < 1e-3 for k, v in table.followers.items() for t, p in v.items())
    assert PhraseTable.load(tmp_path / "nowhere", vocab_size=10) is None
    with pytest.raises(PhraseError, match="outside this model's vocabulary"):
        PhraseTable.load(tmp_path, vocab_size=5)
    (tmp_path / PHRASES_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(PhraseError, match="is not a phrase table"):
        PhraseTable.load(tmp_path, vocab_size=10)


def test_adapter_folder_brings_its_phrase_table(tiny_base, tmp_path):
    folder = save_adapter(random_adapter(tiny_base, 0), tmp_path / "adapter")
    assert build_model(tiny_base, folder).phrases is None
    PhraseTable.build(REPLIES).save(folder)
    assert len(build_model(tiny_base, folder).phrases) == len(PhraseTable.build(REPLIES))
