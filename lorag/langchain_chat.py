"""LangChain's ChatOpenAI for a lorag server, keeping what ChatOpenAI drops: the answer's ``citations``,
``context``, ``attribution`` and ``generator`` land in ``message.response_metadata`` (also when streaming).

    chat = ChatLorag(base_url="http://127.0.0.1:8000/v1", api_key=KEY, model="lorag")
    message = chat.invoke("How long is the warranty?")
    message.response_metadata["citations"]  # [{"number": 1, "source": ..., "page": ..., "text": ...}, ...]

Send lorag's request options through ChatOpenAI's ``extra_body``, e.g. ``extra_body={"retrieval": {"k": 3}}``.
"""

from langchain_openai import ChatOpenAI

# lorag's response fields, beyond OpenAI's
LORAG_FIELDS = ("citations", "context", "attribution", "generator")


class ChatLorag(ChatOpenAI):
    """ChatOpenAI whose messages carry lorag's citations in ``response_metadata``."""

    def _create_chat_result(self, response, generation_info=None):
        result = super()._create_chat_result(response, generation_info)
        extras = _lorag_fields(response if isinstance(response, dict) else response.model_dump())
        for generation in result.generations:
            generation.message.response_metadata.update(extras)
        return result

    def _convert_chunk_to_generation_chunk(self, chunk, default_chunk_class, base_generation_info):
        generation = super()._convert_chunk_to_generation_chunk(chunk, default_chunk_class, base_generation_info)
        extras = _lorag_fields(chunk)  # only the stream's last chunk has them
        if generation is not None and extras:
            generation.message.response_metadata.update(extras)
        return generation


def _lorag_fields(body: dict) -> dict:
    return {field: body[field] for field in LORAG_FIELDS if field in body}
