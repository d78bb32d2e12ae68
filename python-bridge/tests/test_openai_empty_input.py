"""Empty input to the OpenAI server, as vLLM treats it: an empty `messages` list is a 400 naming the
parameter and the fix, an empty string as a message's content is accepted (a client may send it, e.g. an
assistant turn with nothing said), and the notebook API is the strict one (kernel/src/api/validate.ts)."""

from __future__ import annotations

import pytest

from qwenbook_bridge.openai.schema import OpenAIError, parse_chat_request


def test_an_empty_messages_list_is_a_400_saying_what_to_send():
    with pytest.raises(OpenAIError) as err:
        parse_chat_request({"model": "m", "messages": []})
    assert err.value.status == 400
    assert err.value.param == "messages"
    assert "send at least one message" in err.value.message


def test_an_empty_content_string_is_accepted():
    req = parse_chat_request({"model": "m", "messages": [{"role": "user", "content": ""},
                                                         {"role": "assistant", "content": ""},
                                                         {"role": "user", "content": [{"type": "text", "text": ""}]}]})
    assert [m["content"] for m in req.messages] == ["", "", ""]
