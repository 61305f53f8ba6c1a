from specstream.context_grams import ContextGrams


def slow_shares(text: list[int], key: tuple[int, ...]) -> dict[int, float]:
    """What followed `key` in `text`, counted the obvious way."""
    follows = [text[i + len(key)] for i in range(len(text) - len(key)) if tuple(text[i : i + len(key)]) == key]
    return {token: follows.count(token) / len(follows) for token in set(follows)}


def test_shares_follow_the_longest_ending_seen_before():
    grams = ContextGrams([1, 2, 3, 1, 2, 4, 1, 2])
    assert grams.next_tokens((1, 2)) == {3: 0.5, 4: 0.5}
    assert grams.next_tokens((9, 3, 1, 2)) == {4: 1.0}  # "3 1 2" was followed by 4 only
    assert grams.next_tokens((7, 8)) == {}  # never seen, nor its last token
    assert grams.next_tokens((7, 3)) == {1: 1.0}  # falls back to the last token alone


def test_adding_text_piece_by_piece_counts_as_all_at_once():
    text = [5, 6, 5, 6, 7, 5, 6, 5, 8, 6, 5, 6, 7]
    grams = ContextGrams(text[:3])
    for start in range(3, len(text), 4):
        grams.next_tokens((5,))  # counts what has come so far; the rest waits for the next ask
        grams.extend(text[start : start + 4])
    whole = ContextGrams(text)
    for key in [(5,), (6,), (5, 6), (6, 5), (5, 6, 5), (8, 6, 5)]:
        assert grams.next_tokens(key) == whole.next_tokens(key) == slow_shares(text, key)
