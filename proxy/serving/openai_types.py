"""OpenAI request types, parsed once into validated Structs (extra fields clients send are tolerated)."""

from __future__ import annotations

from typing import Annotated, Literal, Union

import msgspec

from proxy.errors import InvalidRequest

Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]
TopP = Annotated[float, msgspec.Meta(gt=0, le=1)]
MaxTokens = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
Seed = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
Penalty = Annotated[float, msgspec.Meta(ge=-2, le=2)]
Stop = Union[str, Annotated[list[str], msgspec.Meta(max_length=4)], None]


class ContentPart(msgspec.Struct):
    type: str
    text: Union[str, None] = None


class ChatMessageIn(msgspec.Struct):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: Union[str, None] = None

    def text(self, index: int) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for j, part in enumerate(self.content):
            if part.type != "text" or part.text is None:
                raise InvalidRequest(f"Only text content parts are supported, got {part.type!r}.",
                                     param=f"messages[{index}].content[{j}].type")
            parts.append(part.text)
        return "".join(parts)


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _Common(msgspec.Struct, kw_only=True):
    model: str
    max_tokens: Union[MaxTokens, None] = None
    temperature: Union[Temperature, None] = None
    top_p: Union[TopP, None] = None
    n: Union[Annotated[int, msgspec.Meta(ge=1, le=128)], None] = None
    stream: Union[bool, None] = False
    stream_options: Union[StreamOptions, None] = None
    stop: Stop = None
    seed: Union[Seed, None] = None
    user: Union[str, None] = None
    presence_penalty: Union[Penalty, None] = None
    frequency_penalty: Union[Penalty, None] = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def check_common(self) -> None:
        if self.n not in (None, 1):
            raise InvalidRequest("Only n=1 is supported.", param="n")
        if self.presence_penalty or self.frequency_penalty:
            raise InvalidRequest("presence_penalty and frequency_penalty are not supported; send 0 or omit them.",
                                 param="presence_penalty" if self.presence_penalty else "frequency_penalty")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                                 param="stream_options")


class ChatCompletionRequest(_Common, kw_only=True):
    messages: Annotated[list[ChatMessageIn], msgspec.Meta(min_length=1)]
    max_completion_tokens: Union[MaxTokens, None] = None

    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Common, kw_only=True):
    prompt: Union[str, Annotated[list[str], msgspec.Meta(min_length=1, max_length=1)]]
    echo: Union[bool, None] = False
    suffix: Union[str, None] = None

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def output_limit(self) -> int | None:
        return self.max_tokens


_decoders = {
    ChatCompletionRequest: msgspec.json.Decoder(ChatCompletionRequest),
    CompletionRequest: msgspec.json.Decoder(CompletionRequest),
}


def parse(body: bytes, kind: type):
    try:
        req = _decoders[kind].decode(body)
    except msgspec.ValidationError as exc:
        reason, _, where = str(exc).rpartition(" - at `$")
        param = where.rstrip("`").lstrip(".") or None
        if not reason:
            reason = str(exc)
        raise InvalidRequest(f"Invalid value for '{param}': {reason}" if param else reason, param=param) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    except UnicodeDecodeError:
        raise InvalidRequest("The request body is not valid UTF-8.") from None
    except RecursionError:
        raise InvalidRequest("The request body is nested too deeply.") from None
    req.check_common()
    if kind is CompletionRequest and (req.echo or req.suffix):
        raise InvalidRequest("echo and suffix are not supported.", param="echo" if req.echo else "suffix")
    return req
