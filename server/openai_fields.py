"""OpenAI request fields and turns lorag does not implement, refused by name (400 with ``param``).

vLLM refuses what it cannot honour instead of answering as if the field were absent; so does lorag, so a
client that sent ``tools`` or ``response_format`` never takes a plain answer for a tool call or a JSON object.
Fields whose value asks for nothing (``tools: []``, ``n: 1``, ``response_format: {"type": "text"}``) pass.
"""

from core.prompt import ChatMessage
from server.errors import InvalidRequest

_NO_TOOLS = "lorag answers from the tenant's documents and does not call tools or functions"


def refuse_unimplemented(body, *, logprobs: bool) -> None:
    """Raise for the first field of ``body`` (a ChatRequest or CompletionRequest) that asks for something
    lorag cannot do. ``logprobs``: the generator can report token log-probabilities.

    Raises:
        InvalidRequest: 400 with ``param`` naming the field.
    """
    if body.n is not None and body.n > 1:
        raise InvalidRequest(f"n={body.n}: lorag returns one choice per request; send n=1 or leave n out", param="n")
    if getattr(body, "tools", None) and getattr(body, "tool_choice", None) != "none":
        raise InvalidRequest(f"tools: {_NO_TOOLS}; leave tools out", param="tools")
    if getattr(body, "tool_choice", None) not in (None, "none", "auto"):
        raise InvalidRequest(f"tool_choice={body.tool_choice!r}: {_NO_TOOLS}; leave tool_choice out",
                             param="tool_choice")
    if getattr(body, "functions", None) and getattr(body, "function_call", None) != "none":
        raise InvalidRequest(f"functions: {_NO_TOOLS}; leave functions out", param="functions")
    if getattr(body, "function_call", None) not in (None, "none", "auto"):
        raise InvalidRequest(f"function_call: {_NO_TOOLS}; leave function_call out", param="function_call")
    response_format = getattr(body, "response_format", None)
    if response_format is not None and response_format.get("type") != "text":
        raise InvalidRequest(
            f"response_format type {response_format.get('type')!r} is not supported: lorag answers in text with "
            "[n] citations; send {'type': 'text'} or leave response_format out", param="response_format")
    if body.logprobs and not logprobs:
        raise InvalidRequest("logprobs: this server's generator reports no token log-probabilities (the extractive "
                             "generator quotes passages, it does not sample tokens); leave logprobs out",
                             param="logprobs")
    if getattr(body, "top_logprobs", None) and not body.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    if getattr(body, "logit_bias", None):
        raise InvalidRequest("logit_bias is not supported; leave it out", param="logit_bias")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise InvalidRequest(f"{name} is not supported; repetition_penalty (vLLM's extension) is", param=name)
    modalities = getattr(body, "modalities", None)
    if modalities and set(modalities) != {"text"}:
        raise InvalidRequest(f"modalities={modalities}: lorag answers in text only", param="modalities")
    for name in ("audio", "prediction"):
        if getattr(body, name, None) is not None:
            raise InvalidRequest(f"{name} is not supported; leave it out", param=name)


def chat_turns(messages) -> tuple[ChatMessage, ...]:
    """The request's turns as the prompt builder takes them: ``developer`` is a system turn.

    Raises:
        InvalidRequest: a tool or function turn, an assistant turn that calls tools, or a turn without text.
    """
    turns = []
    for index, message in enumerate(messages):
        where = f"messages.{index}"
        if message.role in ("tool", "function"):
            raise InvalidRequest(
                f"{where}.role is {message.role!r}: {_NO_TOOLS}, so there are no tool results to read; leave tool "
                "turns (and the assistant turns with tool_calls before them) out of the conversation",
                param=f"{where}.role")
        if message.tool_calls or message.function_call:
            field = "tool_calls" if message.tool_calls else "function_call"
            raise InvalidRequest(
                f"{where}.{field}: {_NO_TOOLS}; leave the assistant turns that call tools out of the conversation",
                param=f"{where}.{field}")
        if message.content is None:
            raise InvalidRequest(f"{where}.content: a {message.role} turn needs text content",
                                 param=f"{where}.content")
        role = "system" if message.role == "developer" else message.role
        turns.append(ChatMessage(role=role, content=message.content))
    return tuple(turns)
