"""IncrementalDetokenizer against tokenizer.decode: random ids, random chunking, stop strings."""

from __future__ import annotations

import random
from typing import Any

import pytest

from pdserve.config.sampling_params import SamplingParams
from pdserve.protocol import Finish
from pdserve.tokenizer_proc.incremental_detokenizer import (
    IncrementalDetokenizer,
    text_ids,
    token_texts,
    top_token_texts,
)

TEXTS = [
    "Héllo wörld — 日本語のテキスト 😀 and ünïcödé: ñandú, αβγ, привет, 안녕하세요!",
    "The lighthouse keeper climbed the stairs. Ça va? Ég er hér. 東京は大きい。",
    "emoji run: 😀😃😄😁🙂🙃 family 👨‍👩‍👧 flags 🇯🇵🇫🇷, math ∑∫√∞ ≠ ≤ ≥",
    "plain ascii text with numbers 1234567890 and punctuation !@#$%^&*()",
]


def chunks(ids: list[int], rng: random.Random) -> list[list[int]]:
    """ids cut at random points (pieces of 1 to 4 tokens, sometimes empty)."""
    out, i = [], 0
    while i < len(ids):
        n = rng.choice([0, 1, 1, 1, 2, 3, 4])
        out.append(ids[i : i + n])
        i += n
    return out


def run(detok: IncrementalDetokenizer, pieces: list[list[int]], matched: Any = None) -> list[str]:
    deltas = [detok.add(p) for p in pieces]
    deltas.append(detok.finish(matched))
    return deltas


def random_ids(tokenizer: Any, rng: random.Random) -> list[int]:
    """Any ids at all (stray bytes, specials), or real non-ASCII text with specials mixed in."""
    vocab = len(tokenizer)
    if rng.random() < 0.5:
        return [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
    text = rng.choice(TEXTS)
    start = rng.randrange(len(text))
    ids = tokenizer.encode(text[start : start + rng.randrange(1, 40)])
    for _ in range(rng.randrange(3)):
        ids.insert(rng.randrange(len(ids) + 1), rng.choice(tokenizer.all_special_ids))
    return ids


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_deltas_concatenate_to_decode_of_random_ids(tokenizer: Any, skip_special_tokens: bool):
    rng = random.Random(1234 + skip_special_tokens)
    for _ in range(400):
        ids = random_ids(tokenizer, rng)
        detok = IncrementalDetokenizer(tokenizer, None, skip_special_tokens, True, (), False)
        deltas = run(detok, chunks(ids, rng))
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_prompt_tail_does_not_leak_into_output(tokenizer: Any):
    rng = random.Random(7)
    for _ in range(200):
        prompt = random_ids(tokenizer, rng)
        ids = tokenizer.encode(rng.choice(TEXTS)[: rng.randrange(1, 60)])
        detok = IncrementalDetokenizer(tokenizer, prompt, True, True, (), False)
        deltas = run(detok, chunks(ids, rng))
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", TEXTS[:3])
def test_deltas_never_split_a_character(tokenizer: Any, text: str):
    ids = tokenizer.encode(text)
    assert any(tokenizer.decode([i]) == "\ufffd" for i in ids)  # the text does split characters
    detok = IncrementalDetokenizer(tokenizer, None, True, True, (), False)
    shown = ""
    for i in ids:  # one token at a time: the hardest case
        delta = detok.add([i])
        assert "\ufffd" not in delta
        shown += delta
        assert text.startswith(shown)
    assert shown + detok.finish() == text


def test_each_step_decodes_a_small_window(tokenizer: Any):
    ids = tokenizer.encode(" ".join(TEXTS) * 3)
    detok = IncrementalDetokenizer(tokenizer, None, True, True, (), False)
    decode, sizes = detok._decode, []
    detok._decode = lambda window: sizes.append(len(window)) or decode(window)
    text = "".join(detok.add([i]) for i in ids) + detok.finish()
    assert text == tokenizer.decode(ids)
    assert len(ids) > 300 and max(sizes) <= 8  # 4-byte emoji are split over up to 4 tokens


def worker_stop(tokenizer: Any, ids: list[int], stops: tuple[str, ...]) -> tuple[int, str] | None:
    """Like the worker: the first step whose decoded output contains a stop string."""
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:n])
        for stop in stops:
            if stop in text:
                return n, stop
    return None


@pytest.mark.parametrize("no_stop_trim", [False, True])
def test_stop_strings_are_held_back_and_trimmed(tokenizer: Any, no_stop_trim: bool):
    rng = random.Random(99)
    num_matched = 0
    for _ in range(300):
        text = rng.choice(TEXTS)
        ids = tokenizer.encode(text)
        full = tokenizer.decode(ids)
        # Stop strings taken from the text (so they match), plus one that never does.
        stops = []
        for _ in range(rng.randrange(1, 3)):
            start = rng.randrange(len(full) - 1)
            stops.append(full[start : start + rng.randrange(1, 6)])
        stops.append("zzz-never")
        hit = worker_stop(tokenizer, ids, tuple(stops))
        n, matched = hit if hit else (len(ids), None)
        num_matched += hit is not None
        detok = IncrementalDetokenizer(tokenizer, None, True, True, tuple(stops), no_stop_trim)
        streamed = "".join(detok.add(p) for p in chunks(ids[:n], rng))
        final = detok.finish(matched)
        out = tokenizer.decode(ids[:n])
        if matched is None:
            assert streamed + final == out
            continue
        pos = out.find(matched)
        assert len(streamed) <= pos, "a delta showed part of the stop string"
        assert streamed + final == out[: pos + len(matched) if no_stop_trim else pos]
    assert num_matched > 250


def test_stop_string_prefix_is_released_when_it_does_not_complete(tokenizer: Any):
    detok = IncrementalDetokenizer(tokenizer, None, True, True, ("keeper!",), False)
    shown = "".join(detok.add([i]) for i in tokenizer.encode("The keeper"))
    assert shown == "The "  # "keeper" could still become "keeper!"
    shown += "".join(detok.add([i]) for i in tokenizer.encode(" climbed"))
    assert shown == "The keeper climbed"
    assert detok.finish(None) == ""


def test_special_tokens_skipped_or_kept(tokenizer: Any):
    ids = tokenizer.encode("<|im_start|>assistant\nHi there<|im_end|>")
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in ids
    skipped = IncrementalDetokenizer(tokenizer, None, True, True, (), False)
    assert "".join(run(skipped, [[i] for i in ids])) == "assistant\nHi there"
    kept = IncrementalDetokenizer(tokenizer, None, False, True, (), False)
    assert "".join(run(kept, [[i] for i in ids])) == "<|im_start|>assistant\nHi there<|im_end|>"


def test_matched_stop_token_is_not_in_the_text(tokenizer: Any):
    eos = tokenizer.eos_token_id
    ids = tokenizer.encode("Hi there") + [eos]
    assert text_ids(ids, eos, no_stop_trim=False) == ids[:-1]
    assert text_ids(ids, eos, no_stop_trim=True) == ids
    assert text_ids(ids, "there", no_stop_trim=False) == ids
    detok = IncrementalDetokenizer(tokenizer, None, False, True, (), False)
    text = detok.add(ids[:2]) + detok.add(text_ids(ids[2:], eos, False)) + detok.finish(eos)
    assert text == "Hi there"


def test_token_texts_decode_each_id_alone(tokenizer: Any):
    ids = tokenizer.encode("Hi é<|im_end|>")
    texts = token_texts(tokenizer, ids)
    assert texts == [tokenizer.decode([i]) for i in ids]
    assert texts[-1] == "<|im_end|>" and "\ufffd" in texts


def test_top_token_texts_decode_each_alternative_alone(tokenizer: Any):
    ids = tokenizer.encode("Hi é<|im_end|>")
    top = [[[i, -0.5], [ids[0], -1.0], [ids[-1], -2.0]] for i in ids] + [[], [[ids[1], -0.1]]]
    texts = top_token_texts(tokenizer, top)
    assert texts == [[tokenizer.decode([int(a)]) for a, _ in row] for row in top]
    assert [len(row) for row in texts] == [3] * len(ids) + [0, 1]
    assert texts[0][2] == "<|im_end|>" and any("\ufffd" in row[0] for row in texts[:-2])


@pytest.mark.parametrize("no_stop_trim", [False, True])
def test_add_output_leaves_out_a_matched_stop_token(tokenizer: Any, no_stop_trim: bool):
    eos = tokenizer.eos_token_id
    ids = tokenizer.encode("Hi there, ça va")
    params = SamplingParams(skip_special_tokens=False, no_stop_trim=no_stop_trim)
    detok = IncrementalDetokenizer.for_request(tokenizer, [], params)
    text = detok.add_output(ids[:3], None) + detok.add_output(ids[3:] + [eos], Finish.stop(eos))
    shown = ids + [eos] if no_stop_trim else ids
    assert text == tokenizer.decode(shown, skip_special_tokens=False)


@pytest.mark.parametrize("no_stop_trim", [False, True])
def test_add_output_cuts_at_a_matched_stop_string(tokenizer: Any, no_stop_trim: bool):
    ids = tokenizer.encode("The keeper climbed the stairs")
    full = tokenizer.decode(ids)
    params = SamplingParams(stop=("climb",), no_stop_trim=no_stop_trim)
    detok = IncrementalDetokenizer.for_request(tokenizer, [], params)
    streamed = detok.add_output(ids[:-1], None)
    assert "climb" not in streamed
    text = streamed + detok.add_output(ids[-1:], Finish.stop("climb"))
    end = full.index("climb") + (len("climb") if no_stop_trim else 0)
    assert text == full[:end]


def test_add_output_flushes_everything_on_length_or_abort(tokenizer: Any):
    ids = tokenizer.encode("emoji 😀 at the end 😀")
    for finish in (Finish.at_length(len(ids)), Finish.abort("gone")):
        detok = IncrementalDetokenizer.for_request(tokenizer, [], SamplingParams())
        text = "".join(detok.add_output([i], None) for i in ids[:-1])
        assert text + detok.add_output(ids[-1:], finish) == tokenizer.decode(ids)


def test_add_after_finish_is_refused(tokenizer: Any):
    detok = IncrementalDetokenizer(tokenizer, None, True, True, (), False)
    detok.finish()
    with pytest.raises(RuntimeError):
        detok.add([5])


def metaspace_tokenizer() -> Any:
    """A SentencePiece-style tokenizer: decode strips the leading space of the first word."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"], show_progress=False)
    tok.train_from_iterator(["hello world, the world says hello"] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)


def test_leading_space_kept_after_a_prompt_with_sentencepiece_style_decoding():
    tok = metaspace_tokenizer()
    prompt, output = tok.encode("hello"), tok.encode("world says")
    assert tok.decode(output) == "world says"  # decoded alone, the first space is stripped
    with_prompt = IncrementalDetokenizer(tok, prompt, True, True, (), False)
    assert "".join(run(with_prompt, [[i] for i in output])) == " world says"
    alone = IncrementalDetokenizer(tok, None, True, True, (), False)
    assert "".join(run(alone, [[i] for i in output])) == "world says"
    for_request = IncrementalDetokenizer.for_request(tok, prompt, SamplingParams())
    assert "".join(run(for_request, [[i] for i in output])) == " world says"
