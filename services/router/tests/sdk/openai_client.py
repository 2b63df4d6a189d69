"""Drives the router's OpenAI-compatible API with OpenAI's official Python client, changed only
in base URL and key, and prints what it saw as one JSON object for the Rust test to check.

Usage: openai_client.py BASE_URL API_KEY
"""

import json
import sys

import openai

base_url, api_key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
seen = {"sdk_version": openai.__version__}

reply = client.chat.completions.create(
    model="canned",
    messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
    max_tokens=32,
)
seen["plain"] = {
    "content": reply.choices[0].message.content,
    "finish_reason": reply.choices[0].finish_reason,
    "total_tokens": reply.usage.total_tokens,
}

raw = client.chat.completions.with_raw_response.create(
    model="canned", messages=[{"role": "user", "content": "hi"}]
)
seen["deployment_header"] = raw.headers.get("x-colony-deployment")

text, usage, finish = [], None, None
stream = client.chat.completions.create(
    model="canned",
    messages=[{"role": "user", "content": "hi"}],
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage.completion_tokens
    for choice in chunk.choices:
        if choice.delta.content:
            text.append(choice.delta.content)
        if choice.finish_reason:
            finish = choice.finish_reason
seen["stream"] = {"content": "".join(text), "completion_tokens": usage, "finish_reason": finish}

tools = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
call = client.chat.completions.create(
    model="canned", messages=[{"role": "user", "content": "weather in Oslo?"}], tools=tools
)
tool_call = call.choices[0].message.tool_calls[0]
answer = client.chat.completions.create(
    model="canned",
    tools=tools,
    messages=[
        {"role": "user", "content": "weather in Oslo?"},
        call.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": tool_call.id, "content": "sunny"},
    ],
)
seen["tools"] = {
    "finish_reason": call.choices[0].finish_reason,
    "name": tool_call.function.name,
    "arguments": json.loads(tool_call.function.arguments),
    "answer": answer.choices[0].message.content,
}

streamed_args = []
for chunk in client.chat.completions.create(
    model="canned",
    messages=[{"role": "user", "content": "weather in Oslo?"}],
    tools=tools,
    stream=True,
):
    for choice in chunk.choices:
        for delta in choice.delta.tool_calls or []:
            if delta.function and delta.function.arguments:
                streamed_args.append(delta.function.arguments)
seen["stream_tool_arguments"] = "".join(streamed_args)

seen["models"] = [model.id for model in client.models.list()]

# The client asks for base64 unless told otherwise and decodes it itself.
embedded = client.embeddings.create(
    model="minilm", input=["The cat sits on the mat.", "A kitten is lying on a rug."]
)
seen["embeddings"] = {
    "count": len(embedded.data),
    "dimensions": len(embedded.data[0].embedding),
    "similarity": sum(a * b for a, b in zip(embedded.data[0].embedding, embedded.data[1].embedding)),
    "prompt_tokens": embedded.usage.prompt_tokens,
}

try:
    client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    seen["bad_model"] = "no error"
except openai.BadRequestError as error:
    seen["bad_model"] = {"status": error.status_code, "message": error.message}

try:
    openai.OpenAI(base_url=base_url, api_key="sk-wrong", max_retries=0).models.list()
    seen["bad_key"] = "no error"
except openai.AuthenticationError as error:
    seen["bad_key"] = {"status": error.status_code}

print(json.dumps(seen))
