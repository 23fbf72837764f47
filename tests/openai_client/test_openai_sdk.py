"""The official OpenAI Python SDK against a running `switchboard serve`.

Run by scripts/openai-sdk-test, which starts the server and sets:
  SWITCHBOARD_BASE_URL   e.g. http://127.0.0.1:8123
  SWITCHBOARD_ADMIN_KEY  the server's admin key (to issue a rate-limited key)
  SWITCHBOARD_KEY        a chat key

The point is that a stock client works unchanged: every call below is plain
SDK usage with `base_url` pointed at switchboard and `model` naming an agent.
"""

import json
import os
import sys
import unittest
import urllib.request
import uuid

import openai

BASE_URL = os.environ["SWITCHBOARD_BASE_URL"]
ADMIN_KEY = os.environ["SWITCHBOARD_ADMIN_KEY"]
KEY = os.environ["SWITCHBOARD_KEY"]
MODEL = "echo"


def client(key=KEY, **options):
    return openai.OpenAI(base_url=f"{BASE_URL}/v1", api_key=key, **options)


def issue_key(body):
    """Issues a key over the admin API (plain HTTP: not an OpenAI route)."""
    request = urllib.request.Request(
        f"{BASE_URL}/admin/keys",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["key"]


def history(conversation_id):
    request = urllib.request.Request(
        f"{BASE_URL}/v1/conversations/{conversation_id}",
        headers={"Authorization": f"Bearer {KEY}"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["messages"]


class OpenAiSdk(unittest.TestCase):
    def test_a_completion_has_the_reply_and_usage(self):
        raw = client().chat.completions.with_raw_response.create(
            model=MODEL,
            messages=[
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hello there"},
            ],
            temperature=0.3,
            max_tokens=64,
        )
        completion = raw.parse()
        self.assertEqual(completion.object, "chat.completion")
        self.assertEqual(completion.model, MODEL)
        self.assertTrue(completion.id.startswith("chatcmpl-"), completion.id)
        choice = completion.choices[0]
        self.assertEqual(choice.message.role, "assistant")
        self.assertEqual(choice.message.content, "echo: hello there")
        self.assertEqual(choice.finish_reason, "stop")
        usage = completion.usage
        self.assertGreater(usage.prompt_tokens, 0)
        self.assertGreater(usage.completion_tokens, 0)
        self.assertEqual(usage.total_tokens, usage.prompt_tokens + usage.completion_tokens)
        self.assertTrue(raw.headers["x-conversation-id"].startswith("chat-"))

    def test_a_stream_has_the_text_and_usage(self):
        stream = client().chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "one two three"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        self.assertEqual(chunks[0].choices[0].delta.role, "assistant")
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        self.assertEqual(text, "echo: one two three")
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        self.assertEqual(finishes[-1], "stop")
        self.assertTrue(all(f is None for f in finishes[:-1]), finishes)
        last = chunks[-1]
        self.assertEqual(last.choices, [])
        self.assertGreater(last.usage.prompt_tokens, 0)
        self.assertGreater(last.usage.completion_tokens, 0)
        self.assertEqual(
            last.usage.total_tokens, last.usage.prompt_tokens + last.usage.completion_tokens
        )

    def test_the_conversation_header_keeps_the_context(self):
        conversation = f"sdk-{uuid.uuid4().hex}"
        headers = {"X-Conversation-Id": conversation}
        first = client().chat.completions.with_raw_response.create(
            model=MODEL,
            messages=[{"role": "user", "content": "first"}],
            extra_headers=headers,
        )
        self.assertEqual(first.headers["x-conversation-id"], conversation)
        self.assertEqual(first.parse().choices[0].message.content, "echo: first")
        second = client().chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "second"}],
            extra_headers=headers,
            stream=True,
        )
        text = "".join(c.choices[0].delta.content or "" for c in second if c.choices)
        self.assertEqual(text, "echo: second")
        contents = [m["content"] for m in history(conversation)]
        self.assertEqual(contents, ["first", "echo: first", "second", "echo: second"])

    def test_models_lists_the_agents(self):
        models = client().models.list()
        ids = [model.id for model in models]
        self.assertIn(MODEL, ids)
        self.assertEqual(client().models.retrieve(MODEL).id, MODEL)
        with self.assertRaises(openai.NotFoundError):
            client().models.retrieve("nobody")

    def test_errors_are_the_sdk_exceptions(self):
        with self.assertRaises(openai.NotFoundError) as caught:
            client().chat.completions.create(
                model="nobody", messages=[{"role": "user", "content": "hi"}]
            )
        self.assertEqual(caught.exception.code, "model_not_found")
        with self.assertRaises(openai.BadRequestError) as caught:
            client().chat.completions.create(
                model=MODEL, messages=[{"role": "assistant", "content": "hi"}]
            )
        self.assertEqual(caught.exception.param, "messages[0].role")
        with self.assertRaises(openai.AuthenticationError):
            client(key="sb-not-a-key-0000000000").models.list()

    def test_a_rate_limited_key_raises_rate_limit_error(self):
        limited = client(key=issue_key({"name": "sdk-rpm-1", "limits": {"rpm": 1}}), max_retries=0)
        messages = [{"role": "user", "content": "once"}]
        limited.chat.completions.create(model=MODEL, messages=messages)
        with self.assertRaises(openai.RateLimitError) as caught:
            limited.chat.completions.create(model=MODEL, messages=messages)
        error = caught.exception
        self.assertEqual(error.status_code, 429)
        self.assertEqual(error.code, "rate_limit_exceeded")
        self.assertTrue(error.response.headers.get("retry-after"))


if __name__ == "__main__":
    print(f"openai {openai.__version__}, python {sys.version.split()[0]}")
    unittest.main(verbosity=2)
