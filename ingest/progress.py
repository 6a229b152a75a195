"""A terminal progress bar for ingest runs (files done, chunks embedded, chunks/s) built on tqdm."""

import sys
import time


class IngestProgress:
    """Passed to ``ingest_paths`` by the CLI when stderr is a terminal; the server passes none."""

    def __init__(self, *, stream=None):
        self.stream = stream or sys.stderr
        self.bar = None
        self.chunks = 0
        self.started = time.perf_counter()

    def start(self, total_files: int) -> None:
        from tqdm import tqdm

        self.started = time.perf_counter()
        self.bar = tqdm(total=total_files, unit="file", file=self.stream, desc="ingest")

    def file_done(self, *, chunks: int, elapsed: float | None = None) -> None:
        """``elapsed``: seconds since the files started, on the clock the run's summary uses (``processing_seconds``)."""
        self.chunks += chunks
        if self.bar is None:
            return
        elapsed = max(elapsed if elapsed is not None else time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix(chunks=self.chunks, rate=f"{chunks_per_second(self.chunks, elapsed):.1f} chunks/s",
                             refresh=False)
        self.bar.update(1)

    def write(self, message: str) -> None:
        """Print a line above the bar without breaking it."""
        if self.bar is None:
            print(message, file=self.stream)
        else:
            self.bar.write(message, file=self.stream)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def chunks_per_second(chunks: int, seconds: float) -> float:
    return chunks / seconds if seconds > 0 else 0.0


def should_show_progress(stream, environ) -> bool:
    """Show a bar only on an interactive terminal outside CI (the CLI passes ``os.environ``)."""
    if str(environ.get("CI", "")).lower() in {"1", "true", "yes"}:
        return False
    return bool(getattr(stream, "isatty", lambda: False)())
