"""mmbridge runs as lmms-eval models: `--model mmbridge --model_args run=RUN[,device=cpu]`.

The run is loaded with `runs.load_run` and answers with `eval.evaluate.generate_answers`, the code
`mmbridge eval` answers with (greedy, KV-cached, left-padded batches of `--batch_size`): each request's images
are written to a scratch folder as PNG (lossless) and read back as `mmbridge eval` reads its files.

`MMBridgeChat` (lmms-eval's default for a model with a chat class) reads a request's chat messages: a message's
parts joined by newlines, each image part an `<image>`, as `mmbridge serve` reads an OpenAI request.
`MMBridgeSimple` (`--force_simple`) reads the simple protocol: the request's images, each on its own line, then its
text. Only `generate_until` is implemented: log-likelihood requests raise NotImplementedError (rank answers with
`mmbridge eval --task choice`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms
from tqdm.auto import tqdm

from mmbridge.models.language import IMAGE_TOKEN
from mmbridge.serve.request import ROLES

DEFAULT_BATCH = 16  # `mmbridge eval --batch-size`
DEFAULT_MAX_NEW_TOKENS = 24  # `mmbridge eval --max-new-tokens`, where a task gives none


class MMBridgeChat(lmms):
    """A run directory as an lmms-eval chat model. `run`: the run directory; `device`: `auto` (the GPU when there
    is one), `cpu`, `cuda`, ...; `batch_size`: questions decoded together (lmms-eval's `--batch_size`)."""

    is_simple = False

    def __init__(self, run: str | None = None, device: str | None = None, batch_size=None, **kwargs) -> None:
        super().__init__()
        from mmbridge.runs import load_run

        kwargs.pop("max_batch_size", None)  # lmms-eval passes it to every model; batches here are batch_size
        if kwargs:
            raise TypeError(f"model_args {sorted(kwargs)}: not understood (mmbridge takes run, device, batch_size)")
        if not run:
            raise ValueError("model_args run=...: the mmbridge run directory to evaluate is required")
        self.batch_size_per_gpu = _batch_size(batch_size)
        self.model, self.processor = load_run(run, device=device or "auto")
        self.run = str(run)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # -- lmms-eval's three entry points --------------------------------------------------------------------------

    def generate_until(self, requests) -> list[GenerationResult]:
        """Each request's greedy answer: requests with the same settings go together in their order, `batch_size`
        at a time, their documents' images read one batch at a time."""
        settings = [_settings(r.args[self._GEN_KWARGS]) for r in requests]
        answers: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="mmbridge", disable=self.rank != 0, dynamic_ncols=True)
        for setting in dict.fromkeys(settings):
            rows = [i for i, s in enumerate(settings) if s == setting]
            max_new_tokens, until = setting
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                texts = self._answer([self._conversation(requests[i]) for i in chunk], max_new_tokens)
                for i, text in zip(chunk, texts):
                    answers[i] = _cut(text, until)
                bar.update(len(chunk))
        bar.close()
        return [GenerationResult(text=a, token_counts=TokenCounts()) for a in answers]

    def loglikelihood(self, requests):
        raise NotImplementedError(
            "mmbridge as an lmms-eval model generates answers only (generate_until); log-likelihood requests "
            "(loglikelihood and multiple_choice tasks) are not implemented: rank candidate answers with "
            "`mmbridge eval --task choice`"
        )

    def generate_until_multi_round(self, requests):
        raise NotImplementedError(
            "mmbridge as an lmms-eval model answers one question per document (generate_until); multi-round tasks "
            "are not implemented"
        )

    # -- requests → conversations -----------------------------------------------------------------------------

    _GEN_KWARGS = 2  # where a chat request's args hold its generation settings

    def _conversation(self, request) -> tuple[list[dict], list]:
        """(turns for `Processor.encode_prompt`, the images in the order of their `<image>` tokens)."""
        _, doc_to_messages, _, doc_id, task, split = request.args
        messages = doc_to_messages(self.task_dict[task][split][doc_id])
        turns, images = [], []
        for i, message in enumerate(messages):
            role = message.get("role")
            if role not in ROLES:
                raise ValueError(f"messages[{i}].role: {role!r}, expected one of {sorted(ROLES)}")
            content = message.get("content")
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            pieces = []
            for k, part in enumerate(parts):
                kind = part.get("type")
                if kind == "text":
                    if IMAGE_TOKEN in part["text"]:  # refused as the server refuses it: images come as image parts
                        raise ValueError(f"messages[{i}].content[{k}]: the text holds {IMAGE_TOKEN!r}")
                    pieces.append(part["text"])
                elif kind == "image":
                    pieces.append(IMAGE_TOKEN)
                    images.append(part["url"])
                else:
                    raise NotImplementedError(
                        f"messages[{i}].content[{k}]: a {kind!r} part; mmbridge reads text and image parts"
                    )
            turns.append({"from": ROLES[role], "value": "\n".join(pieces)})
        return turns, images

    def _answer(self, conversations: list[tuple[list[dict], list]], max_new_tokens: int) -> list[str]:
        """Greedy answers to `conversations` by `generate_answers`, the images read back from PNG files."""
        from mmbridge.data.images import load_image
        from mmbridge.eval.evaluate import generate_answers

        with tempfile.TemporaryDirectory(prefix="mmbridge-lmms-") as folder:
            records = []
            for n, (turns, images) in enumerate(conversations):
                names = []
                for j, image in enumerate(images):
                    if isinstance(image, str | Path):  # a file path: read as `mmbridge eval` reads files
                        image = load_image(image)
                    names.append(f"{n}-{j}.png")
                    image.convert("RGB").save(Path(folder, names[-1]))
                record = {"id": str(n), "conversations": [*turns, {"from": "gpt", "value": ""}]}
                if names:
                    record["image"] = names
                records.append(record)
            return generate_answers(
                self.model, self.processor, records, folder, max_new_tokens, self.batch_size, progress=False
            )


class MMBridgeSimple(MMBridgeChat):
    """The same model for lmms-eval's simple protocol (`--force_simple`): a request's images, each on its own line,
    then its text, as one user turn."""

    is_simple = True
    _GEN_KWARGS = 1

    def _conversation(self, request) -> tuple[list[dict], list]:
        context, _, doc_to_visual, doc_id, task, split = request.args
        images = list(doc_to_visual(self.task_dict[task][split][doc_id]) or [])
        for j, image in enumerate(images):
            if not hasattr(image, "convert") and not isinstance(image, str | Path):
                raise NotImplementedError(f"doc {doc_id} visual {j}: a {type(image).__name__}; mmbridge reads images")
        return [{"from": "user", "value": f"{IMAGE_TOKEN}\n" * len(images) + context}], images


def _batch_size(value) -> int:
    """lmms-eval's `--batch_size` (1 by default, 'auto' or 'auto:N' allowed) as questions per batch."""
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"batch_size={value!r}: expected a positive integer or 'auto'") from None
    if n < 1:
        raise ValueError(f"batch_size={n}: expected at least 1")
    return n


def _settings(gen_kwargs: dict) -> tuple[int, tuple[str, ...]]:
    """(max_new_tokens, stop strings) from a request's generation settings; sampling is refused: these answers
    are greedy, as `mmbridge eval`'s."""
    gen = dict(gen_kwargs or {})
    sample = gen.get("do_sample")
    temperature = float(gen.get("temperature") or 0)
    if sample or (sample is None and temperature > 0):
        raise NotImplementedError(
            f"generation_kwargs do_sample={sample}, temperature={temperature}: mmbridge answers lmms-eval greedily; "
            "set do_sample: false (or temperature: 0)"
        )
    if gen.get("num_beams", 1) not in (1, None):
        raise NotImplementedError(f"generation_kwargs num_beams={gen['num_beams']}: mmbridge decodes greedily")
    until = gen.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    max_new_tokens = int(gen.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
    if max_new_tokens < 1:
        raise ValueError(f"generation_kwargs max_new_tokens={max_new_tokens}: expected at least 1")
    return max_new_tokens, tuple(s for s in until if s)


def _cut(text: str, until: tuple[str, ...]) -> str:
    """`text` before the first of the stop strings `until`."""
    cuts = [i for i in (text.find(s) for s in until) if i >= 0]
    return text[: min(cuts)] if cuts else text
