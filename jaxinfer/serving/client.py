"""A small client of `jaxinfer.v1.Inference`: one channel, the API key sent with every call.

client = Client("127.0.0.1:50051", api_key=None)
for piece in client.stream("The capital of France is", max_tokens=32, temperature=0):
    print(piece.text, end="")
client.generate([1, 2, 3], max_tokens=8).token_ids
# each prompt token after the first: its logprob (`token_id`, `logprob`) and its top-n (`top`)
client.generate("The capital of France is", max_tokens=1, prompt_logprobs=2).prompt_logprobs

The calls return the proto's GenerateResponse messages as they are (a stream sends
`prompt_logprobs` once, in its first response).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import grpc

from jaxinfer.serving.options import API_KEY_ENV
from jaxinfer.serving.proto import inference_pb2 as pb
from jaxinfer.serving.proto import inference_pb2_grpc as pb_grpc
from jaxinfer.validate import as_bias_pairs


def generate_request(
    prompt: str | Sequence[int], *, request_id: str = "", chat: bool = False, **sampling
) -> pb.GenerateRequest:
    """A GenerateRequest of text or token ids; `sampling` holds SamplingParams fields (`stop`
    one string or a list of them; `logit_bias` a dict {token id: bias}, its ids ints or
    decimal strings, or (id, bias) pairs). The server checks the values."""
    if isinstance(sampling.get("stop"), str):  # protobuf would take it as a list of characters
        sampling["stop"] = [sampling["stop"]]
    if sampling.get("logit_bias") is not None:
        sampling["logit_bias"] = _bias_map(sampling["logit_bias"])
    request = pb.GenerateRequest(
        request_id=request_id, chat=chat, sampling=pb.SamplingParams(**sampling)
    )
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    return request


def _bias_map(value) -> dict[int, float]:
    """`logit_bias` as the proto's map {int64 id: bias}; an id given twice is refused here (the
    map would keep one of them). The server checks the ids' range and the biases."""
    return dict(as_bias_pairs("logit_bias", value))


MAX_ANSWER_BYTES = 64 << 20


def credentials(root_cert: str | None) -> grpc.ChannelCredentials | None:
    """TLS credentials trusting the PEM file `root_cert` (None: plaintext)."""
    if root_cert is None:
        return None
    with open(root_cert, "rb") as f:
        return grpc.ssl_channel_credentials(root_certificates=f.read())


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


class Client:
    """Blocking calls over one channel. `api_key` None reads $JAXINFER_API_KEY."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        api_key: str | None = None,
        root_cert: str | None = None,
    ):
        creds = credentials(root_cert)
        # answers up to 64 MiB (gRPC's default is 4): a long prompt's prompt_logprobs
        options = [("grpc.max_receive_message_length", MAX_ANSWER_BYTES)]
        self.channel = (
            grpc.secure_channel(target, creds, options)
            if creds
            else grpc.insecure_channel(target, options)
        )
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.metadata = auth_metadata(
            api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        )

    def generate(self, prompt, *, timeout: float | None = None, **kw) -> pb.GenerateResponse:
        """The whole answer in one response; `kw`: request_id, chat, SamplingParams fields."""
        return self.stub.Generate(
            generate_request(prompt, **kw), timeout=timeout, metadata=self.metadata
        )

    def stream(
        self, prompt, *, timeout: float | None = None, **kw
    ) -> Iterator[pb.GenerateResponse]:
        """The answer piece by piece; the last response has finish_reason. `.cancel()` stops it."""
        return self.stub.GenerateStream(
            generate_request(prompt, **kw), timeout=timeout, metadata=self.metadata
        )

    def model_info(self, timeout: float | None = None) -> pb.ModelInfoResponse:
        return self.stub.ModelInfo(pb.ModelInfoRequest(), timeout=timeout, metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
