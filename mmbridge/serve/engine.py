"""One generation thread for the server: requests queue up and the ones waiting are decoded together.

The model runs on this thread only, so concurrent requests never share a forward pass by accident. When
it is free it takes every waiting job (up to `max_batch`), left-pads their prompts into one batch and
calls `MultimodalLM.generate` with one temperature, top-p and generator per row. A job is answered as soon
as its own reply ends (stop token, stop string, its token limit), not when the whole batch ends; a job that
arrives during a batch waits for the next one.

One job cannot stop the others: its sampling settings are checked when it is submitted, its generator is made
on its own, and a `notify` callback that raises only ends its own row. Request threads encode prompts with the
processor's tokenizer; this thread decodes with its own copy, so a long prompt never holds up a batch.
"""

from __future__ import annotations

import copy
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mmbridge.data.layouts import batch_index
from mmbridge.data.views import pad_to
from mmbridge.models import sampling
from mmbridge.serve.text import ReplyText

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One request's prompt, settings and progress. `notify(kind, value)` is called from the engine thread:
    ("delta", text) for each settled piece of text, then ("done", None) or ("error", exception)."""

    prompt: list[int]
    pixels: torch.Tensor | None  # [n_images, 3, H, W]
    max_new_tokens: int
    reply: ReplyText
    notify: Callable[[str, object], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    instructions: list[list[int]] = field(default_factory=list)  # per image, for an instruction-aware Q-Former
    # under a varying model.tiling: the processor's image inputs (`Processor.images`: visual_index, views, ...)
    images: dict | None = None
    generated: int = 0  # tokens the model produced for this reply, its stop token included
    finish_reason: str | None = None  # "stop" or "length" ("error" after a failure)
    cancelled: bool = False  # set by the server when the client has gone: the row ends at the next token
    generator: torch.Generator | None = None  # made by the engine thread when the job's batch starts

    def tell(self, kind: str, value) -> None:
        """`notify`, except that a callback that raises (its client gone, its event loop closed) is logged and
        ends this job's row, not the batch or the engine thread."""
        try:
            self.notify(kind, value)
        except Exception:  # noqa: BLE001 - whatever the callback raised is the callback's, not the batch's
            log.exception("a job's notify(%r) raised; its row ends", kind)
            self.cancelled = True

    def take(self, token: int, stop_ids: set[int]) -> bool:
        """One new token; True once this reply is complete."""
        if self.finish_reason is not None:
            return True
        self.generated += 1
        if token in stop_ids:
            return self.finish("stop")
        piece = self.reply.push(token)
        if piece:
            self.tell("delta", piece)
        if self.reply.stopped:
            return self.finish("stop")
        if self.generated >= self.max_new_tokens or self.cancelled:
            return self.finish("length")
        return False

    def finish(self, reason: str) -> bool:
        if self.finish_reason is None:
            self.finish_reason = reason
            piece = self.reply.finish()
            if piece:
                self.tell("delta", piece)
            self.tell("done", None)
        return True

    def fail(self, error: BaseException) -> None:
        if self.finish_reason is None:
            self.finish_reason = "error"
            self.tell("error", error)


class Engine:
    """Runs `model.generate` for queued `Job`s on its own thread, `max_batch` waiting jobs at a time."""

    def __init__(self, model, processor, max_batch: int = 8, start: bool = True):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: expected at least 1")
        self.model, self.processor, self.max_batch = model, processor, max_batch
        self.stop_ids = set(processor.stop_token_ids)
        self.batch_sizes: list[int] = []  # the size of every batch run so far (for tests and benchmarks)
        self.batch_seconds: float | None = None  # a moving average of how long a batch takes
        self._queue: queue.Queue = queue.Queue()
        self._encode_lock = threading.Lock()  # request threads take turns with the processor's tokenizer
        self._decoder = copy.deepcopy(processor.tokenizer)  # this thread's own: decoding never waits on an encode
        self._thread = threading.Thread(target=self._loop, name="mmbridge-generate", daemon=True)
        if start:
            self.start()

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Finish the batch in progress and stop the thread; jobs still queued get an error."""
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue `job`; ValueError if its sampling settings are not finite and in range (`sampling.check`)."""
        sampling.check(job.temperature, job.top_p)
        self._queue.put(job)

    def wait_estimate(self, requests: int) -> float:
        """Seconds until `requests` jobs ahead are decoded, from recent batches (1 s a batch before any ran)."""
        return math.ceil(requests / self.max_batch) * (self.batch_seconds or 1.0)

    def encode_prompt(self, turns: list[dict], counts: list | None = None) -> list[int]:
        """The prompt, each image expanded to `counts` (its own span under a tiling) or the bridge's count.
        Called from request threads; the generation thread does not wait for it."""
        with self._encode_lock:
            return self.processor.encode_prompt(turns, counts)

    def instruction_ids(self, turns: list[dict]) -> list[list[int]]:
        if not self.processor.instructions:
            return []
        with self._encode_lock:
            return self.processor.instruction_ids(turns)

    def decode(self, ids: list[int]) -> str:
        """Token ids → text as `mmbridge chat` decodes them (special tokens skipped); for the generation thread."""
        return self._decoder.decode(ids, skip_special_tokens=True)

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                break
            batch = [job]
            closing = False
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    closing = True
                    break
                batch.append(more)
            try:
                self._run(batch)
            except Exception as e:  # noqa: BLE001 - the thread outlives any batch
                log.exception("a batch of %d failed", len(batch))
                for job in batch:
                    job.fail(e)
            if closing:
                break
        while True:  # closed: refuse what is still waiting
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.fail(RuntimeError("the server is shutting down"))

    def _run(self, batch: list[Job]) -> None:
        for job in batch:  # a client gone while its job waited: nothing to decode for it
            if job.cancelled:
                job.finish("length")
        for job in batch:  # each job's own generator, so a bad seed fails only its job
            if job.finish_reason is None and job.temperature >= sampling.GREEDY_BELOW:
                try:
                    job.generator = self._generator(job.seed, self.model.device)
                except Exception as e:  # noqa: BLE001
                    log.exception("a job's generator could not be made")
                    job.fail(e)
        batch = [job for job in batch if job.finish_reason is None]
        if not batch:
            return
        self.batch_sizes.append(len(batch))
        start = time.perf_counter()
        try:
            self._generate(batch)
        except Exception as e:  # noqa: BLE001 - every waiting client gets the error, the thread lives on
            log.exception("generation failed for a batch of %d", len(batch))
            for job in batch:
                job.fail(e)
            return
        took = time.perf_counter() - start
        self.batch_seconds = took if self.batch_seconds is None else 0.8 * self.batch_seconds + 0.2 * took
        for job in batch:  # the batch ran out of steps before this reply ended
            job.finish("length")

    def _generate(self, batch: list[Job]) -> None:
        model, proc = self.model, self.processor
        device = model.device
        ids = proc.pad([j.prompt for j in batch], proc.pad_id, left=True)
        mask = proc.left_mask([j.prompt for j in batch])
        pixels = [j.pixels for j in batch if j.pixels is not None]
        extra = self._image_inputs(batch, device)
        instructions = [s for j in batch for s in j.instructions]
        if instructions:
            extra["instruction_ids"] = proc.pad_text(instructions).to(device)
        generators = [j.generator for j in batch]
        if pixels:
            pixels = pad_to(pixels) if "view_sizes" in extra else torch.cat(pixels)
        model.generate(
            ids.to(device),
            mask.to(device),
            pixels.to(device) if len(pixels) else None,
            max_new_tokens=max(j.max_new_tokens for j in batch),
            eos_token_ids=sorted(self.stop_ids),
            temperature=[j.temperature for j in batch],
            top_p=[j.top_p for j in batch],
            generator=generators,
            **extra,
            on_token=lambda toks: [t is None or j.take(t, self.stop_ids) for j, t in zip(batch, toks)],
        )

    def _image_inputs(self, batch: list[Job], device) -> dict:
        """Under a varying tiling: the batch's `visual_index` (each job's shifted past the views before it) and,
        for views of their own sizes, `view_sizes`."""
        tiled = [j.images for j in batch if j.images is not None and "visual_index" in j.images]
        if not tiled:
            return {}
        out = {
            "visual_index": batch_index(
                [t["visual_index"].numpy() for t in tiled], [t["views"] for t in tiled], self.processor.num_image_tokens
            ).to(device)
        }
        if "view_sizes" in tiled[0]:
            out["view_sizes"] = torch.cat([t["view_sizes"] for t in tiled]).to(device)
        return out

    @staticmethod
    def _generator(seed: int | None, device: torch.device) -> torch.Generator:
        """A request's own random stream on the model's device: seeded, or from fresh entropy."""
        g = torch.Generator(device=device)
        if seed is None:
            g.seed()
        else:
            g.manual_seed(seed)
        return g
