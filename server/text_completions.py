"""A /v1/completions request as the chat turn it is answered as: the prompt is the user's message, so
retrieval, citations and limits are the chat's. Fields only the legacy API has are refused by name."""

from server.errors import InvalidRequest
from server.openai_fields import refuse_unimplemented
from server.schemas import ChatRequest, CompletionRequest


def as_chat_request(body: CompletionRequest) -> ChatRequest:
    """Raises: InvalidRequest (400, ``param`` set) for a prompt that is not one text, or an unimplemented field."""
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise InvalidRequest("prompt: send one text (a string, or a list of one string); lorag answers one "
                                 "prompt per request and does not take token ids", param="prompt")
        prompt = prompt[0]
    if body.logprobs is not None:
        raise InvalidRequest("logprobs is not supported on /v1/completions; leave it out", param="logprobs")
    if body.echo:
        raise InvalidRequest("echo is not supported: the prompt is answered from documents, not continued",
                             param="echo")
    if body.suffix:
        raise InvalidRequest("suffix is not supported (no insertion mode)", param="suffix")
    if body.best_of is not None and body.best_of > 1:
        raise InvalidRequest(f"best_of={body.best_of}: lorag generates one candidate; send 1 or leave it out",
                             param="best_of")
    refuse_unimplemented(body, logprobs=False)
    return ChatRequest(
        model=body.model, messages=[{"role": "user", "content": prompt}], max_tokens=body.max_tokens,
        temperature=body.temperature, top_p=body.top_p, repetition_penalty=body.repetition_penalty, stop=body.stop,
        stream=body.stream, stream_options=body.stream_options, seed=body.seed, user=body.user,
        retrieval=body.retrieval, sources_in_content=body.sources_in_content,
    )
