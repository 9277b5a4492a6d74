"""The official `openai` client against a running `kestrel serve`.

run.sh starts the server and sets KESTREL_BASE_URL; generation lengths are
small so this runs quickly on the CPU.
"""

import os

import openai
import pytest

BASE_URL = os.environ.get("KESTREL_BASE_URL", "http://127.0.0.1:8000/v1")
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client():
    return openai.OpenAI(base_url=BASE_URL, api_key=os.environ.get("KESTREL_API_KEY", "unused"))


@pytest.fixture(scope="module")
def model(client):
    models = client.models.list().data
    assert len(models) == 1
    return models[0].id


def test_chat_plain_and_streaming_agree(client, model):
    messages = [{"role": "user", "content": "Name one planet."}]
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0
    assert 1 <= r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text == choice.message.content
    assert finish == choice.finish_reason
    assert usage.completion_tokens == r.usage.completion_tokens


def test_completions_plain_and_streaming_agree(client, model):
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
    assert r.choices[0].text
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, stream=True)
        if c.choices
    )
    assert streamed == r.choices[0].text


def test_stop_string_cuts_the_text(client, model):
    full = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    ).choices[0].text
    assert len(full) > 8, full
    stop = full[4:7]
    r = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
    )
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_n_choices(client, model):
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say a word."}],
        max_tokens=4,
        temperature=0.9,
        seed=5,
        n=2,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage.completion_tokens == 8
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=3, n=3, temperature=0.8)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]


def test_logprobs(client, model):
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token

    r = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2, extra_body={"ignore_eos": True}
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert all(x <= 0 for x in lp.token_logprobs)


def test_errors_are_raised_as_openai_exceptions(client, model):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt=PROMPT, max_tokens=2, temperature=5)
    assert "temperature" in str(e.value)


def test_completions_echo_with_logprobs(client, model):
    args = dict(model=model, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    r = client.completions.create(echo=True, **args)
    c = r.choices[0]
    assert c.text.startswith(PROMPT)
    lp = c.logprobs
    n_prompt = r.usage.prompt_tokens
    n = len(lp.tokens)
    assert n == n_prompt + 3
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    # As OpenAI's legacy API: the first prompt token has no log-probability.
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert all(len(top) == 2 for top in lp.top_logprobs[1:])
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    # text_offset points into the choice's text.
    assert lp.text_offset == sorted(lp.text_offset)
    assert lp.text_offset[n_prompt] == len(PROMPT)
    for i in range(1, n):
        assert c.text[lp.text_offset[i] :].startswith(lp.tokens[i]), (i, lp.tokens[i])

    # Without echo: the same generated tokens and log-probabilities.
    plain = client.completions.create(**args).choices[0].logprobs
    assert plain.tokens == lp.tokens[n_prompt:]
    assert plain.token_logprobs == pytest.approx(lp.token_logprobs[n_prompt:], abs=1e-5)

    # Streamed: the chunks add up to the same text and lists.
    text, tokens, logprobs = "", [], []
    for chunk in client.completions.create(echo=True, stream=True, **args):
        for ch in chunk.choices:
            text += ch.text
            if ch.logprobs is not None:
                tokens += ch.logprobs.tokens
                logprobs += ch.logprobs.token_logprobs
    assert text == c.text
    assert tokens == lp.tokens
    assert logprobs[0] is None
    assert logprobs[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-5)

    # max_tokens=0 scores the prompt alone.
    s = client.completions.create(model=model, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    assert s.choices[0].text == PROMPT
    assert s.usage.completion_tokens == 0
    scores = s.choices[0].logprobs.token_logprobs
    assert len(scores) == n_prompt and scores[0] is None
    assert scores[1:] == pytest.approx(lp.token_logprobs[1:n_prompt], abs=1e-5)
