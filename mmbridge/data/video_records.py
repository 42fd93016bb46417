"""A conversation source whose video records come out as the images the bridge reads (`video.expand`)."""

from __future__ import annotations

from mmbridge.data.video import VideoSampling, expand, load_frames


class VideoRecords:
    """Wraps a source (`RecordFile`, `ShardRecords`): `load` gives each record with its video laid out as
    images and frames, so indexing and tokenising see `<image>` placeholders only and count a video's
    tokens as the bridge emits them. `kind` names the video settings too, so a data index cached for
    other settings is not reused. Everything else is the source's own."""

    def __init__(self, store, sampling: VideoSampling):
        self.store, self.sampling = store, sampling
        self.name, self.files = store.name, store.files
        self.kind = f"{store.kind}-{sampling.key}"

    def __len__(self) -> int:
        return len(self.store)

    def located(self) -> dict:
        return self.store.located()

    @property
    def locate_stream(self):  # the source's, where it has one (else hasattr(...) is False)
        return self.store.locate_stream

    def restore(self, offsets: dict) -> None:
        self.store.restore(offsets)

    def place(self, i: int, record: object = None) -> str:
        return self.store.place(i, record)

    def default_id(self, i: int) -> str:
        return self.store.default_id(i)

    def image_ref(self, i: int, name: str) -> str:
        return self.store.image_ref(i, name)

    def image(self, i: int, name: str):
        return self.store.image(i, name)

    def _locate(self, i: int):
        """Where record `i`'s video files are: under the image root (None for shards: not supported)."""
        return None if self.store.kind == "shards" else (lambda name: self.store.image_ref(i, name))

    def load_plain(self, i: int) -> tuple[object, bool]:
        rec, plain = self.store.load_plain(i)
        if isinstance(rec, dict) and "video" in rec:
            rec = expand(rec, self.sampling, self.store.place(i, rec), self._locate(i))
        return rec, plain

    def load(self, i: int) -> object:
        return self.load_plain(i)[0]

    def frames(self, i: int, units: list[list]) -> list:
        """Every frame of record `i`'s visual inputs (`video.record_units`), in order, as PIL images."""
        return load_frames(units, lambda name: self.store.image(i, name), self._locate(i))
