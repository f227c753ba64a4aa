"""An MLflow run: params, metrics, text and files, kept through a tracking store's outages."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fcnseg.engine.loggers.base import ExperimentLogger
from fcnseg.errors import UserError
from fcnseg.utils.logging import get_logger

# MLflow refuses a param value longer than this (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH).
_MAX_PARAM_LENGTH = 6000
_STATUS = {"finished": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}
_BATCH = 1000  # MLflow's limit on metrics per log_batch call
_MAX_PENDING = 100_000  # metric values held while the store does not answer
# A server that does not answer costs each call at most this (MLflow's own defaults: 7 retries
# with exponential backoff, 120 s each, minutes of stalled training per call).
_HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


class MLflowLogger(ExperimentLogger):
    """An MLflow run: the resolved configuration as params (flattened: ``trainer.max_iters``),
    the scalars as metrics, text as artifacts, and the files the trainer hands over (the best
    checkpoint, ``metrics.json``) as artifacts.

    The run's identity is kept in ``run_dir/mlflow.json``, so that a resumed run continues the
    same MLflow run. MLflow cannot rewrite a metric's history: a resumed run skips, per metric,
    the steps already logged (an exact resume recomputes the same values).

    A tracking store that stops answering mid-run (a server restarted, the network down) does
    not stop training: the failure is one warning, the metrics wait in memory and are sent,
    with their steps, once a retry (every ``retry_after`` seconds) gets through; text and
    artifacts that could not be sent are named in a warning. Against a server, each call gives
    up after ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` retries (3 here unless set) of at most
    ``MLFLOW_HTTP_REQUEST_TIMEOUT`` seconds (20 unless set), so an outage costs training a few
    seconds per retry, not MLflow's default of minutes.

    Args:
        run_dir: the run's folder.
        resume_from: the iteration a resumed run continues from.
        tracking_uri: a tracking server (``http://host:5000``), a database
            (``sqlite:///mlflow.db``) or a local folder (``file:PATH`` or a plain path).
        experiment: the MLflow experiment, created when missing.
        run_name: shown in the MLflow UI; ``None``: the run directory's last two parts.
        log_checkpoints: store ``best.pt`` with the run (at the end of training).
        retry_after: seconds between attempts while the store does not answer.

    Raises:
        UserError: MLflow is not installed, or the store does not answer when the run starts.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        resume_from: int | None = None,
        tracking_uri: str,
        experiment: str = "fcnseg",
        run_name: str | None = None,
        log_checkpoints: bool = True,
        retry_after: float = 60.0,
    ) -> None:
        if "://" not in tracking_uri and not tracking_uri.startswith("file:"):
            tracking_uri = Path(tracking_uri).resolve().as_uri()  # a folder
        if tracking_uri.startswith("file:"):
            # MLflow 3 keeps its file store in maintenance mode behind this switch; a local
            # folder needs no server or database, so it stays the default here.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        for name, value in _HTTP_LIMITS.items():
            os.environ.setdefault(name, value)
        try:
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError as err:
            raise UserError(
                "logger=mlflow needs MLflow, which is not installed: pip install 'fcnseg[mlflow]'"
            ) from err
        self.run_dir, self.log_checkpoints = Path(run_dir), log_checkpoints
        self.logged: dict[str, int] = {}  # metric -> last step it holds (a resumed run)
        self.params: set[str] = set()
        self.pending: list[Any] = []  # metrics not yet accepted by the store
        self.retry_after, self.failed_at = retry_after, None
        record = self.run_dir / "mlflow.json"
        self.run_id = None
        try:
            self.client = MlflowClient(tracking_uri)
            if resume_from is not None and record.is_file():
                previous = json.loads(record.read_text())
                if previous.get("tracking_uri") == tracking_uri:
                    with contextlib.suppress(MlflowException):
                        self._continue(previous["run_id"])
            if self.run_id is None:
                name = run_name or "/".join(self.run_dir.resolve().parts[-2:])
                run = self.client.create_run(
                    self._experiment_id(experiment), run_name=name,
                    tags={"fcnseg.run_dir": str(self.run_dir.resolve())},
                )  # fmt: skip
                self.run_id = run.info.run_id
        except Exception as err:  # MlflowException, the HTTP client's errors, OSError
            raise UserError(
                f"logger.mlflow.tracking_uri={tracking_uri}: MLflow could not start a run there "
                f"({_first_line(err)})"
            ) from err
        record.write_text(json.dumps({"tracking_uri": tracking_uri, "run_id": self.run_id}))
        get_logger().info("MLflow run %s at %s", self.run_id, tracking_uri)

    def _experiment_id(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # created meanwhile by another run of the sweep
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _continue(self, run_id: str) -> None:
        run = self.client.get_run(run_id)
        self.params = set(run.data.params)  # MLflow refuses to change a param's value
        for key in run.data.metrics:
            self.logged[key] = max(m.step for m in self.client.get_metric_history(run_id, key))
        self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def _send(self, what: str, call: Callable[[], Any], *, final: bool = False) -> bool:
        """Makes one call to the store; a failure is a warning, not the end of training.

        While the store is failing, calls made before ``retry_after`` seconds have passed are
        not attempted. ``final`` calls (the run's last: its checkpoint, the remaining metrics,
        the end) are always attempted, and each failure is said, since none will follow.
        """
        log = get_logger()
        waiting = (
            self.failed_at is not None and time.monotonic() - self.failed_at < self.retry_after
        )
        if waiting and not final:
            return False
        try:
            call()
        except Exception as err:  # MlflowException, the HTTP client's errors, OSError
            if final:  # no retry follows: said every time, and no outage begins
                log.warning("MLflow could not %s (%s)", what, _first_line(err))
                return False
            if self.failed_at is None:
                log.warning(
                    "MLflow could not %s (%s); training goes on, train.log and the other "
                    "loggers keep every value, and MLflow is retried every %gs",
                    what, _first_line(err), self.retry_after,
                )  # fmt: skip
            self.failed_at = time.monotonic()
            return False
        if self.failed_at is not None:
            log.info("MLflow answers again")
            self.failed_at = None
        return True

    def log_params(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = [
            Param(key, value[:_MAX_PARAM_LENGTH])
            for key, value in _flatten(config).items()
            if key not in self.params
        ]
        if self._send(
            "log the parameters", lambda: self.client.log_batch(self.run_id, params=params)
        ):
            self.params.update(p.key for p in params)

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for tag, value in values.items():
            if step > self.logged.get(_key(tag), -1):
                self.pending.append(Metric(_key(tag), float(value), now, step))
        if len(self.pending) > _MAX_PENDING:
            get_logger().warning(
                "MLflow has not answered for %d metric values: dropping the oldest",
                len(self.pending),
            )
            del self.pending[: len(self.pending) - _MAX_PENDING]
        self._flush()

    def _flush(self, *, final: bool = False) -> None:
        while self.pending:
            batch = self.pending[:_BATCH]
            call = functools.partial(self.client.log_batch, self.run_id, metrics=batch)
            if not self._send(f"log {len(self.pending)} metric values", call, final=final):
                return
            del self.pending[: len(batch)]

    def log_text(self, tag: str, text: str, step: int) -> None:
        name = f"{_key(tag)}.md"  # the latest one
        self._send(f"store {name}", lambda: self.client.log_text(self.run_id, text, name))

    def log_artifact(self, path: Path) -> None:
        if not path.is_file() or (path.suffix == ".pt" and not self.log_checkpoints):
            return  # e.g. no best.pt: a resumed run that did not beat its checkpoint's best
        folder = path.resolve().parent.relative_to(self.run_dir.resolve()).as_posix()
        call = functools.partial(
            self.client.log_artifact, self.run_id, str(path), None if folder == "." else folder
        )
        self._send(f"store {path} (it stays in the run directory)", call, final=True)

    def close(self, status: str = "finished") -> None:
        self._flush(final=True)
        if self.pending:
            get_logger().warning(
                "%d metric values never reached MLflow (train.log and the other loggers have "
                "them)", len(self.pending),
            )  # fmt: skip
        terminated = functools.partial(
            self.client.set_terminated, self.run_id, status=_STATUS.get(status, "FAILED")
        )
        self._send("close the run", terminated, final=True)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _key(tag: str) -> str:
    """``tag`` with what MLflow refuses in a name (e.g. brackets in a class name) as ``_``."""
    return re.sub(r"[^\w\-. :/]", "_", tag)


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"trainer": {"max_iters": 2}}`` -> ``{"trainer.max_iters": "2"}``; lists as JSON."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = _key(f"{prefix}{key}")
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out
