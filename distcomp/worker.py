"""The worker daemon: claim what fits, run it, watch memory, report exactly once.

One loop does all the work. It sleeps in ``poll`` on the pidfds of its tasks and a signal
wake-up pipe, so a finished task is noticed at once and the worker uses no CPU while tasks run.
Every Redis round trip carries as much as it can: all reports and annotations gathered in one
turn of the loop and the claim for the room they free go out in one pipeline, and one claim
takes several tasks. When Redis is unreachable the tasks keep running and the reports wait; they
are re-sent when it is back, and the queue answers a re-sent report with the outcome it
recorded the first time.

A worker whose claim came back empty does not poll fast: a second thread listens for the
queue's notice that tasks became claimable and wakes the loop through a pipe it polls, so a
submit is picked up at once by idle workers and an idle cluster puts almost no load on Redis.
The thread does nothing else; all state stays with the loop.

A third thread guards memory while the loop waits on Redis: a call can hang for seconds (a
silent partition, a frozen Redis), and the loop lets go of its state for the length of each
call so that the guard can sample, evict and enforce time limits meanwhile (``guard``).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import math
import os
import resource
import select
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psutil

from . import __version__
from .config import OVERCOMMIT_AUTO, Config, ConfigError, WorkerConfig
from .forecast import Outlook, Profile, profile, shape
from .queue import Claim, LeaseLost, Queue, Reaped
from .redis_client import AuthError, ConnectError, RefusedError, ResponseError
from .resources import (
    cgroup_members,
    gib,
    memory_available,
    memory_capacity,
    memory_cgroups,
    mib,
    oom_kills,
    own_cgroup,
    process_start,
    session_rss,
    task_of,
    usable_cores,
)
from .runner import Runner, RunningTask, close_inherited_fds, kill_session, signal_name

log = logging.getLogger("distcomp.worker")

EXIT_STOPPED = 10
PR_SET_DUMPABLE = 4  # prctl(2)
MAX_CLAIM_BATCH = 64
PEAK_WINDOW = 32  # recent peaks behind what a task is expected to use
# A smaller memory_limit is a size given without its unit (bytes): no task runs in it.
MIN_MEMORY_LIMIT = 16 << 20
# Seconds without claims after a task could not start for a fault of the node (``node_fault``):
# the first pause, doubled at each fault in a row up to the last.
FAULT_PAUSES = (2.0, 60.0)
PEAK_CLASSES = 64  # declared sizes whose real use is remembered (least recently seen dropped)
OVERCOMMIT_RANGE = (0.25, 4.0)  # what ``overcommit`` may be
AUTO_OVERCOMMIT_MAX = 2.0  # the most ``overcommit auto`` bets
FILL_SAMPLES = 4  # samples of a task's life before how much of its peak it held is trusted
FILL_TASKS = 4  # such tasks of a class before ``overcommit auto`` departs from 1
GROWTH_HORIZON_S = 30.0  # tasks that would not fill the free memory this soon do not grow into it
# MiB the headroom must grow by, at least, after an empty claim before a sample claims again: a
# node's memory wanders by a few MiB, which with tiny tasks set off claims several times a minute.
ROOM_STEP_MB = 32
SETTLE_S = 1.0  # running tasks that did not grow into it for this long have stopped

# What a class remembers of a task that ended: its peak, and when it ended on its own and was
# sampled enough, how much of the peak it held (``fill``) and its (life, shape).
Record = tuple[int, "float | None", "tuple[float, tuple[float, ...]] | None"]


class Worker:
    def __init__(self, cfg: Config, queue: Queue, drain: bool = False,
                 exit_when_empty: bool = False) -> None:
        wc = cfg.worker
        self.cfg, self.wc, self.q = cfg, wc, queue
        self.name = wc.name
        self.drain_on_term = drain
        self.exit_when_empty = exit_when_empty
        self.token = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.cgroups = memory_cgroups()
        self.cgroup_procs = None
        self.suspects: set[int] = set()  # processes of that cgroup no running task owned
        self.veiled: dict[int, set[str]] = {}  # of those, hidden ones: the tasks they may be of
        if wc.own_cgroup:
            try:
                self.cgroup_procs = own_cgroup()
            except ValueError as exc:
                raise ConfigError(f"own_cgroup: {exc}; run the worker in a cgroup of its own "
                                  f"(its systemd unit) or leave own_cgroup off") from None
        # The worker and what started it (a unit's `sh -c`, `sudo -u`), which may share its
        # cgroup: never strays.
        self.lineage = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
        if 0 < wc.memory_limit < MIN_MEMORY_LIMIT:
            raise ConfigError(
                f"memory_limit is {wc.memory_limit} bytes, too little to run a task in (a number "
                f"without a unit is bytes): give a unit, e.g. {wc.memory_limit}M or "
                f"{wc.memory_limit}G")
        physical = memory_capacity(self.cgroups)
        self.capacity = min(physical, wc.memory_limit) if wc.memory_limit else physical
        default_reserve = min(max(self.capacity // 20, 256 << 20), 2 << 30, self.capacity // 4)
        self.reserve = default_reserve if wc.memory_reserve is None else wc.memory_reserve
        self.evict_below = self.reserve // 2 if wc.evict_below is None else wc.evict_below
        if not 0 <= self.evict_below <= self.reserve < self.capacity:
            raise ConfigError(
                f"memory settings do not fit: need evict_below ({self.evict_below >> 20} MiB) <= "
                f"memory_reserve ({self.reserve >> 20} MiB) < capacity "
                f"({self.capacity >> 20} MiB)")
        check_settings(wc)
        self.cores = wc.cores or usable_cores()
        # Tasks that reserve no cores never fill a node by cores alone: without an explicit cap,
        # 16 tasks per core keeps a file of `min_cpu 0` tasks from becoming a fork bomb.
        self.max_tasks = wc.max_tasks or max(16, int(16 * self.cores))
        if not wc.results_dir:
            raise ConfigError("no results directory: set [worker] results_dir or --results-dir")
        try:
            os.makedirs(wc.results_dir, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create results directory {wc.results_dir}: "
                              f"{exc.strerror}") from None
        if not os.access(wc.results_dir, os.W_OK | os.X_OK):
            raise ConfigError(f"results directory {wc.results_dir} is not writable by "
                              f"{psutil.Process().username()}")
        workdir = wc.workdir or str(Path(wc.results_dir).resolve().parent)
        self.runner = Runner(wc.results_dir, workdir, wc.python, wc.tail_bytes,
                             {"DISTCOMP_WORKER": self.name}, withheld_from_tasks(cfg))
        # Checked now: a python task that cannot start counts a failure, and every one would
        # use up its retries here.
        if not (os.path.isfile(self.runner.python) and os.access(self.runner.python, os.X_OK)):
            raise ConfigError(f"python interpreter {wc.python!r} is not an executable file: "
                              f"set [worker] python or --python to one")
        self.ttl_ms = int(wc.heartbeat_ttl * 1000)
        self.running: dict[str, RunningTask] = {}
        self.by_fd: dict[int, RunningTask] = {}  # every started process not reaped yet
        self.ops: list[tuple[str, RunningTask | None, Any]] = []
        # Claimed while memory ran short during the claim's call: never started, they go back
        # to the queue with the next exchange (``exchange``).
        self.unstarted: list[Claim] = []
        self.kept: list[str] = []  # ids whose files were renamed: the queue is told next exchange
        self.sweep_sids: set[int] = set()
        self.available = self.capacity
        self.tasks_rss = 0
        self.evicting: set[str] = set()  # evicted tasks not yet exited: measure again after
        # After an eviction with tasks beyond their charge left, no claims until a task has
        # ended or they stop growing into it (``sample``): they grow into what victims gave back.
        self.held = False
        self.grew_at = 0.0  # when a sample last found the running tasks growing into free memory
        self.oom_count = 0
        self.last_sample = 0.0
        self.growth_rate = 0.0  # bytes/s the running tasks gained between the last two samples
        self.peaks: collections.deque[int] = collections.deque(maxlen=PEAK_WINDOW)
        # Per declared min_dram_gb: recent (peak, fill, (life, shape)) of such tasks, what such
        # a task is charged where they used more than they declared, the overcommit it got last
        # (see ``learn``) and the forecast of its memory over its life (distcomp.forecast).
        self.classes: collections.OrderedDict[str, collections.deque[Record]] = \
            collections.OrderedDict()
        self.charges: dict[str, float] = {}
        self.factors: dict[str, float] = {}
        self.profiles: dict[str, Profile] = {}
        # Headroom (MiB) when a claim came back empty while tasks ran: it grows as forecast
        # tasks age, and as memory comes back, so a claim is due again once it has grown
        # (``room_grew``).
        self.short_at: float | None = None
        self.stopping = False          # no more claims
        self.fast_stop = False         # requeue and kill what runs
        self.stop_requested = False    # stop-workers: drain, then exit 10
        self.started = time.time()
        self.registered = 0.0  # Redis's time when registration began (``register``)
        self.done = self.evicted = 0
        self.redis_down_since: float | None = None
        self.freed = False             # capacity came back since the last claim
        self.lease_expired = False     # a claim found the lease gone: renew before claiming
        self.fault_pause = 0.0         # the last pause for a fault of the node, 0 once one starts
        self.fault_until = 0.0         # no claims before this (monotonic), see ``node_fault``
        self.fault = ""                # why tasks cannot start here, "" once one does
        self._ready_fds: set[int] = set()
        self.poller = select.poll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.poller.register(self._wake_r, select.POLLIN)
        self._notice_r, self._notice_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.poller.register(self._notice_r, select.POLLIN)
        self.noticed = False           # the queue announced claimable tasks
        self._loop_over = threading.Event()  # ends the listener and guard threads
        # The worker's state belongs to the loop, which holds this lock except while it waits
        # for Redis (``waiting_on_redis``); then the guard thread may take it (``guard``).
        self._state = threading.Lock()
        self._loop_thread: int | None = None
        self._waiting_since: float | None = None
        queue.r.waiting = self.waiting_on_redis

    # -- lifecycle --------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {
            "host": self.host, "pid": os.getpid(), "pstart": process_start(os.getpid()),
            "token": self.token, "started": repr(self.started), "cores": self.cores,
            "mem_total": self.capacity, "reserve": self.reserve, "ttl_ms": self.ttl_ms,
            "room_mb": (self.capacity - self.reserve) >> 20,
            "version": __version__, "results_dir": self.runner.results,
        }

    def register(self) -> bool:
        """Take the worker's name; clean up what a previous instance of this name left. False
        when a stop signal came while another instance held the name."""
        self.registered = self.q.now()  # a stop-workers after this is for this worker
        waited = 0.0
        force = False
        while True:
            ok, payload = self.q.register(self.name, self.token, self.ttl_ms, self.info(), force)
            if ok:
                break
            if self.stopping:
                return False
            if payload.get("host") == self.host and not _alive(payload):
                log.info("previous instance of %s (pid %s) is gone; taking over its lease",
                         self.name, payload.get("pid"))
                force = True
                continue
            if waited == 0:
                log.warning("worker name %r is held by pid %s on %s; waiting for its lease to "
                            "expire", self.name, payload.get("pid"), payload.get("host"))
            select.select([self._wake_r], [], [], 1.0)  # a stop signal's byte ends the wait
            waited += 1.0
        leftovers = payload
        if leftovers:
            attempts = self.kill_orphans(leftovers)
            n = self.q.requeue_worker(self.name, f"requeued: worker {self.name} restarted")
            log.info("requeued %d task(s) left by the previous instance of %s", n, self.name)
            for tid, attempt in attempts.items():
                self.runner.discard_attempt(tid, attempt)
        # A previous instance killed between a report and renaming its files left the record
        # right and the files of an earlier attempt (or none) as the task's output.
        pending = self.q.outputs(self.name)
        renamed = sum(self.runner.keep_attempt(tid, attempt) for tid, attempt in pending)
        if renamed:
            log.info("renamed the output files of %d task(s) whose outcome the previous instance "
                     "of %s had recorded", renamed, self.name)
        if pending:
            self.q.outputs_kept(self.name, [tid for tid, _ in pending])
        return True

    def kill_orphans(self, ids: list[str]) -> dict[str, int]:
        """Processes a crashed instance left behind on this host die before their tasks rerun.
        Returns the attempt each task was at, whose files are to go once it is requeued."""
        attempts = {}
        for tid in ids:
            task = self.q.task(tid) or {}
            attempts[tid] = int(task.get("attempt") or 0)
            if task.get("host") == self.host and task.get("pid"):
                kill_orphan(tid, int(task["pid"]), task.get("pstart", ""))
        return attempts

    def prepare_process(self) -> None:
        """The worker is made not dumpable (``not_dumpable``). Tasks are spawned without
        Popen's fd closing, and each running task holds three
        descriptors (its pidfd and two output files): close inherited descriptors on exec, and
        raise the soft descriptor limit only as far as ``max_tasks`` needs, because tasks
        inherit it (programs that close every descriptor up to the limit slow down with a
        huge one). SIGCHLD goes back to its default: ignored (a parent's setting survives
        exec), the kernel reaps the tasks itself and their exit statuses are lost."""
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        close_inherited_fds()
        not_dumpable()
        need = 3 * self.max_tasks + 64
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < need:
            if hard != resource.RLIM_INFINITY and hard < need:
                log.warning("descriptor limit %d is below the %d that %d tasks may need; raise "
                            "LimitNOFILE or lower max_tasks", hard, need, self.max_tasks)
            resource.setrlimit(resource.RLIMIT_NOFILE, (
                need if hard == resource.RLIM_INFINITY else min(need, hard), hard))

    def install_signals(self) -> None:
        """TERM, INT and HUP stop the worker (``_on_signal``): a hangup is the terminal or ssh
        session of a worker started by hand closing, whose tasks (sessions of their own) would
        otherwise run on, listed as running, after the worker died of it."""
        signal.set_wakeup_fd(self._wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def listen(self) -> None:
        """Listener thread: each notice from the queue (and each (re)subscription, since notices
        sent while disconnected are lost) becomes a byte on the notice pipe. It touches no other
        state of the worker."""
        while not self._loop_over.is_set():
            try:
                sub = self.q.notices()
                try:
                    while not self._loop_over.is_set():
                        if sub.get_message(timeout=1.0) is not None:
                            _poke(self._notice_w)
                finally:
                    sub.close()
            except (ConnectError, OSError) as exc:
                log.debug("notice listener: %s; subscribing again", exc)
                self._loop_over.wait(1.0)
            except ResponseError as exc:
                log.warning("cannot subscribe to %s (%s); new tasks are found by claiming "
                            "every %gs instead", self.q.key("wake"), exc, self.wc.idle_poll)
                return

    @contextlib.contextmanager
    def waiting_on_redis(self) -> Iterator[None]:
        """Around every call the loop makes to Redis: the worker's state is the guard's while
        the call waits."""
        if threading.get_ident() != self._loop_thread:
            yield
            return
        self._waiting_since = time.monotonic()
        self._state.release()
        try:
            yield
        finally:
            self._state.acquire()
            self._waiting_since = None

    def guard(self) -> None:
        """Guard thread: while the loop has been waiting for Redis for longer than a sample
        interval, sample memory, evict and enforce time limits in its place. A call can wait
        for seconds (a silent partition, a frozen or swamped Redis: the client's timeout, then
        a retry), and tasks growing meanwhile would be left to the kernel's OOM killer."""
        while not self._loop_over.wait(self.sample_every()):
            since = self._waiting_since
            if since is None or time.monotonic() - since < self.sample_every():
                continue
            with self._state:
                if self._waiting_since != since:
                    continue
                log.debug("waiting %.1fs for Redis: sampling from the guard thread",
                          time.monotonic() - since)
                self.sample()
                self.check_deadlines(time.monotonic())

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.drain_on_term and not self.stopping:
            self.stopping = True
        else:
            self.stopping = self.fast_stop = True

    # -- memory -----------------------------------------------------------------------------
    def sample(self) -> None:
        """Measure every task's tree and the node's available memory; evict if it is short.

        The decision looks one sample ahead: memory each running task gained since the last
        sample (per second) is assumed to keep coming until the next sample plus the time a
        kill takes, because tasks that grow together can eat the whole reserve in between; a
        task with a forecast only up to the peak it expects (``ahead``). A task's growth counts
        from its first sample on: before it, the task was starting.

        When a task that outgrew its charge remains (``unforeseen``), an eviction also holds
        claims (``held``) until a task ends or the running tasks have not been growing into the
        free memory for a second (``growing_into``): otherwise the memory the victims give back
        is claimed at once by tasks that the same growth evicts a moment later (the packing
        benchmark once started and evicted one task 6 times in 1.2 s; the eviction budget is
        10)."""
        members = cgroup_members(self.cgroup_procs) if self.cgroup_procs else None
        rss, inside = session_rss(members)
        if members is not None:
            self.strays(inside, rss)
        total = growth = 0
        gains = []
        now = time.monotonic()
        for task in self.running.values():
            if "pstart" not in task.extra and task.pid > 0:
                self.annotate(task)
            last = task.rss
            task.rss = rss.get(task.pid, 0)
            task.peak_rss = max(task.peak_rss, task.rss)
            total += task.rss
            if not task.rss and task.samples:
                # Nothing of it holds memory: it has exited and waits to be reaped, which takes
                # as long as the loop waits on Redis (the guard samples meanwhile). Its life
                # ends here, not at the reap, and what it held is not traced on as 0: an 8 s
                # Redis stall made 2 s tasks look 9 s long and a quarter full.
                task.extra.setdefault("exited", now)
                continue
            if task.kill_reason is None:
                # What a task holds at its first sample is its program starting up (a Python
                # task: 25 MB in 50 ms), not growth to project: several tasks starting together
                # looked like 1 GB/s and were evicted at once, and again when they came back.
                gained = max(0, task.rss - last) if task.samples else 0
                gains.append((task, gained))
                growth += gained
                # memory-seconds held, for how much of its peak it held (``fill``)
                task.mem_s += (last + task.rss) / 2 * (now - (task.seen or task.started_mono))
                task.seen = now
                task.samples += 1
                task.trace.add(now - task.started_mono, task.rss)
        elapsed = now - self.last_sample if self.last_sample else 0.0
        self.last_sample = now
        self.growth_rate = growth / elapsed if elapsed > 0 else 0.0
        self.tasks_rss = total
        dying = self.sweep(rss)
        self.available = avail = self.measure_available()
        self.oom_count = oom_kills(self.cgroups)
        if self.growing_into(avail - self.reserve):
            self.grew_at = now
        # A task running alone protects nobody by leaving early: it is measured up to the
        # threshold itself, so its peak tells whether it can ever fit this node.
        shares = self.ahead(gains, (self.sample_every() + 0.1) / elapsed) \
            if len(self.running) > 1 and elapsed > 0 else {}
        projected = avail - math.fsum(shares.values())
        if self.held and not self.evicting and \
                (now - self.grew_at >= SETTLE_S or not self.unforeseen()):
            log.info("taking new tasks again: the running tasks are within their charge or no "
                     "longer growing into the free memory")
            self.held = False
        # Victims that have not exited, or processes just swept, hold memory the kernel is
        # about to give back: measured again at the next sample, not taken for a shortage that
        # running tasks must pay for (a swept 400 MiB process evicted two tasks holding nothing).
        # Unless memory falls below half the threshold meanwhile: victims still in their grace
        # period (a task that saves its work on TERM, or ignores it) get KILL now, before the
        # kernel's OOM killer picks a task of its own choosing.
        if self.evicting and projected < self.evict_below / 2:
            self.kill_victims_now(avail)
        if self.evicting or dying or projected >= self.evict_below:
            return
        alone = len(self.running) == 1
        for victim in self.victims(self.reserve - projected, shares):
            victim.extra["alone"] = alone
            log.warning("memory short (%s available, eviction below %s): evicting task %s "
                        "(started last, using %s)", gib(avail), gib(self.evict_below),
                        victim.task_id, gib(victim.rss))
            self.evicting.add(victim.task_id)
            self.runner.kill(victim, "evict", self.wc.kill_grace)
        if not self.held and self.unforeseen():
            log.info("running tasks hold more memory than they are charged: taking no new "
                     "tasks until one ends or they stop growing")
            self.held = True

    def kill_victims_now(self, avail: int) -> None:
        """KILL the victims still in their grace period (see ``sample``)."""
        now = time.monotonic()
        for tid in self.evicting:
            victim = self.running.get(tid)
            if victim is not None and victim.kill_deadline is not None and \
                    victim.kill_deadline > now + 1.0:
                log.warning("memory critically short (%s available): killing task %s now, "
                            "without the rest of its grace period", gib(avail), tid)
                self.runner.escalate(victim)
                victim.kill_deadline = now + 1.0  # and again a second later, as at a deadline

    def victims(self, shortfall: float, shares: dict[str, float]) -> list[RunningTask]:
        """The youngest tasks whose going brings available memory back up to the reserve, short
        by ``shortfall`` bytes with the growth ``shares`` projected (``ahead``): one at a time is
        too slow when several tasks grow together. Each gives back what it holds and its share
        of the projected growth: counting only what it holds, older tasks that were not growing
        went with it. A task that has ended on its own since the sample counts without being
        picked: reaping it gives its memory back, and killing it would requeue work that is
        done."""
        picked = []
        for task in sorted((t for t in self.running.values() if t.kill_reason is None),
                           key=lambda t: t.started_mono, reverse=True):
            if shortfall <= 0:
                break
            if not self.runner.exited(task):
                picked.append(task)
            shortfall -= task.rss + shares.get(task.task_id, 0.0)
        return picked

    def next_sample(self) -> float:
        """When the loop's next sample is due: a sample interval after the last one, the
        guard's included. The loop sampled again right after a wait the guard had sampled
        through, and a few MiB gained in those milliseconds, scaled to a whole interval,
        looked like a flood and evicted."""
        return self.last_sample + self.sample_every()

    def sample_due(self, mono: float) -> bool:
        return mono >= self.next_sample()

    def ahead(self, gains: list[tuple[RunningTask, int]], scale: float) -> dict[str, float]:
        """Bytes each running task may gain before the next sample has acted on it: what each
        gained over the last sample, ``scale``d to that span, but a task with a forecast no more
        than up to the peak its forecast expects, and a task below its declared memory no more
        than up to that. It stops growing there, and the rate alone would have it go on and set
        off an eviction at every forecast peak, and in a node packed by declarations, where
        little more than the reserve is left once every task is at its peak, at every peak.
        Without a forecast the expected peak is the larger of the declaration and the class's
        charge, as admission took it. A task already beyond what is expected of it keeps its
        rate: the forecast or the declaration was wrong, and it is the task to watch."""
        out = {}
        for task, gained in gains:
            more = gained * scale
            if not more:
                continue
            expected = self.expected_mb(task.claim) * 2**20
            forecast = self.forecast(task)
            if forecast is not None:
                prof, age = forecast
                top = prof.peak_of(age, task.peak_rss, expected)
                if top > task.peak_rss:
                    more = min(more, top - task.rss)
            elif task.rss < expected:
                more = min(more, expected - task.rss)
            out[task.task_id] = more
        return out

    def growing_into(self, free: float) -> bool:
        """Whether the running tasks, at the rate they grew over the last sample, would fill
        ``free`` bytes within ``GROWTH_HORIZON_S``: a task claimed into that memory would be
        evicted soon. Tasks that grow slowly beside plenty of free memory do not hold claims
        until one of them ends, which for tasks of hours would leave the node idle."""
        return self.growth_rate * GROWTH_HORIZON_S > max(0.0, free)

    def unforeseen(self) -> bool:
        """Whether a running task (not being killed) holds more than admission charges it:
        a task of a class without a profile beyond its declaration and its class's charge.
        Its growth is in no forecast, so memory that comes back may be what it grows into."""
        return any(t.kill_reason is None and t.claim.declared not in self.profiles
                   and t.rss > self.expected_mb(t.claim) * 2**20 for t in self.running.values())

    def measure_available(self) -> int:
        """What can still be allocated: the node's (or cgroup's) available memory, and with
        ``memory_limit`` no more than the limit minus what the tasks hold."""
        avail = memory_available(self.cgroups)
        if self.wc.memory_limit:
            avail = min(avail, self.capacity - self.tasks_rss)
        return avail

    def refresh_after_exit(self) -> None:
        """A task just ended: when memory is what holds claims back, read available memory
        again now rather than at the next sample (up to ``sample_interval`` later), so the
        room the task left is offered at once. Reads counters only, no /proc walk. After a claim
        that came back empty, always: the task waiting may be larger than a typical one (a
        reservation, see distcomp.queue ``_CLAIM``)."""
        free_mem = self.free()[0]
        if free_mem >= max(self.estimate_mb(), 1.0) and self.short_at is None:
            return
        self.tasks_rss = sum(t.rss for t in self.running.values())
        self.available = self.measure_available()

    def sample_every(self) -> float:
        """Sample faster while memory is tight: growth is caught between samples."""
        if self.available < 2 * self.reserve + self.growth_rate * self.wc.sample_interval:
            return min(self.wc.sample_interval, 0.05)
        return self.wc.sample_interval

    # -- claiming ---------------------------------------------------------------------------
    def estimate_mb(self) -> float:
        """The size of a typical task here: the mean peak of the worker's recent tasks."""
        return sum(self.peaks) / len(self.peaks) / 2**20 if self.peaks else 0.0

    def learn(self, declared: str, peak: int, filled: float | None = None,
              shaped: tuple[float, tuple[float, ...]] | None = None) -> None:
        """Record the peak of a task that declared ``declared`` (min_dram_gb as submitted),
        and for a task that ended on its own how much of that peak it held over its life and
        its (life, shape) (distcomp.forecast).

        Nobody declares memory correctly, but tasks that declare the same size (none, or the
        same guess for a whole sweep) tend to be alike: a task is charged the mean peak of the
        recent tasks that declared what it declares, when that is more than its declaration, so
        a node does not start more of them than their real size fits. A task whose declaration
        is its own (nobody else declared that size) is charged what it declared.

        ``overcommit`` divides that mean: above 1 more such tasks start than their mean peak
        fits, on the bet that they do not all hold their peak at once, and eviction settles it
        when they do. ``auto`` makes the bet per class from how much of their peak its recent
        tasks held over their life on average (the fill): 1 / sqrt(fill), the geometric middle
        between charging the peak (1) and charging the mean use (1 / fill), at most
        ``AUTO_OVERCOMMIT_MAX``; tasks that reach their peak early and hold it get 1.

        Once enough tasks of a class have a shape, its running tasks are charged by their
        forecast (``outlook``)."""
        self.peaks.append(peak)
        window = self.classes.pop(declared, None) or collections.deque(maxlen=PEAK_WINDOW)
        window.append((peak, filled, shaped))
        self.classes[declared] = window
        if len(self.classes) > PEAK_CLASSES:
            dropped = self.classes.popitem(last=False)[0]
            self.charges.pop(dropped, None)
            self.factors.pop(dropped, None)
            self.profiles.pop(dropped, None)
        prof = profile(s for _, _, s in window if s is not None)
        if prof is None:
            self.profiles.pop(declared, None)
        else:
            if declared not in self.profiles:
                log.info("tasks declaring %s GB: forecasting their memory over their run "
                         "(usually over by %.1f s, at their peak by %.0f%% of it)", declared or "0",
                         prof.life, 100 * prof.peaked())
            self.profiles[declared] = prof
        factor = self.overcommit(declared, window)
        mean_mb = sum(p for p, _, _ in window) / len(window) / 2**20 / factor
        if mean_mb > float(declared or 0) * 1024:
            self.charges[declared] = mean_mb
        else:
            self.charges.pop(declared, None)

    def overcommit(self, declared: str, window: collections.deque[Record]) -> float:
        """What a class's mean peak is divided by: the configured factor, or with ``auto`` the
        one its tasks' mean fill gives (see ``learn``), logged when it changes."""
        if self.wc.overcommit != OVERCOMMIT_AUTO:
            return float(self.wc.overcommit)
        fills = [f for _, f, _ in window if f is not None]
        if len(fills) < FILL_TASKS:
            return 1.0
        held = sum(fills) / len(fills)
        factor = min(AUTO_OVERCOMMIT_MAX, max(1.0, 1 / math.sqrt(held)))
        if abs(factor - self.factors.get(declared, 1.0)) >= 0.05:
            log.info("tasks declaring %s GB held %.0f%% of their peak over their run: charging "
                     "them their mean peak / %.2f", declared or "0", 100 * held, factor)
            self.factors[declared] = factor
        return factor

    def expected_mb(self, claim: Claim) -> float:
        """The peak (MiB) a task is expected to reach: the larger of its declaration and its
        class's charge."""
        return max(self.charges.get(claim.declared, 0.0), claim.mem_mb)

    def forecast(self, task: RunningTask) -> tuple[Profile, float] | None:
        """The profile that forecasts a running task and the task's age at its last sample;
        None when its class has no profile, it was never sampled, or it outlived the usual life."""
        prof = self.profiles.get(task.claim.declared) if self.profiles else None
        if prof is None or not task.samples:
            return None
        age = task.seen - task.started_mono
        return (prof, age) if age < prof.life else None

    def outlook(self) -> Outlook:
        """The running tasks' memory from now on. A task is charged its expected peak (the
        larger of its declaration and its class's charge) or its own peak so far; a task whose
        class has a profile, what its forecast holds at each instant until its expected end."""
        committed = growth = 0.0
        shaped = []
        for t in self.running.values():  # one pass: the loop asks this several times a turn
            expected = self.expected_mb(t.claim)
            rss_mb = t.rss / 2**20
            forecast = self.forecast(t)
            if forecast is not None:
                shaped.append((*forecast, rss_mb, t.peak_rss / 2**20, expected))
                continue
            committed += max(expected, t.peak_rss / 2**20)
            if expected > rss_mb:
                growth += expected - rss_mb
        return Outlook.of(shaped, committed, growth)

    def rooms(self) -> tuple[float, float]:
        """MiB the tasks may commit (capacity minus reserve) and MiB available above the
        reserve now."""
        return (self.capacity - self.reserve) / 2**20, (self.available - self.reserve) / 2**20

    def free(self, outlook: Outlook | None = None) -> tuple[float, float, int]:
        """Memory (MiB) a new task can be charged, cores and task slots a claim may fill."""
        free_mem = (outlook or self.outlook()).free(*self.rooms())
        # Rounded: ten 0.7-core tasks on 7 cores left -8.9e-16 cores, no room for a task that
        # needs none (``has_room``), where the claim allows 1e-9 over.
        free_cpu = round(self.cores - math.fsum(t.claim.cpu for t in self.running.values()), 9)
        slots = min(MAX_CLAIM_BATCH, self.max_tasks - len(self.running))
        return free_mem, free_cpu, slots

    def claim_charges(self, outlook: Outlook, free_mem: float) -> dict[str, float]:
        """What a claim charges a task of each class that has a charge. A class with a profile
        is charged its expected peak scaled by ``free_mem`` / its ``Outlook.fit``: the claim
        compares it with ``free_mem``, so such a task is taken exactly when its growth fits
        the forecast."""
        if not outlook.varies or free_mem <= 0:
            return self.charges
        out = dict(self.charges)
        for declared, expected in self.charges.items():
            prof = self.profiles.get(declared)
            if prof is not None:
                fit = outlook.fit(prof, *self.rooms())
                if fit > free_mem:
                    out[declared] = expected * free_mem / fit
        return out

    def forecasting(self) -> bool:
        """Whether a running task is charged by its forecast (its class has a profile)."""
        return bool(self.profiles) and any(
            t.claim.declared in self.profiles for t in self.running.values())

    def headroom(self) -> float:
        """MiB the largest task a claim could take now may reach: what is free, or for a class
        with a profile the peak a task growing as its class does fits (``Outlook.fit``), which
        grows as the running tasks near their expected end even while nothing ends."""
        outlook = self.outlook()
        free_mem = self.free(outlook)[0]
        if not outlook.varies:
            return free_mem
        rooms = self.rooms()
        return max(free_mem, *(outlook.fit(prof, *rooms) for prof in self.profiles.values()))

    def claimed_nothing(self) -> None:
        """A claim came back empty: with tasks running, remember the headroom, so that the
        loop claims again once a sample finds more (``room_grew``: the forecast freed it, a
        task shrank, the kernel gave back cache) rather than at the idle poll."""
        self.short_at = self.headroom() if self.running else None

    def room_grew(self) -> bool:
        """Whether, since a claim came back empty, the headroom has grown by a quarter of a
        typical task or more, and ``ROOM_STEP_MB`` at least (checked at each sample; the claim
        is then tried at once)."""
        if self.short_at is None or \
                self.headroom() < self.short_at + max(self.estimate_mb() / 4, ROOM_STEP_MB):
            return False
        self.short_at = None
        return True

    def sweep(self, sessions: Mapping[int, int] | None = None) -> int:
        """Kill what ended tasks left in their sessions (processes that moved to groups of
        their own), in ``sessions`` (session id: resident bytes), those that had processes at
        the last sample, or all (None: the worker is leaving, no sample comes after). A
        session's id is the pid of the task that began it, and the number is free again once
        nothing is left in the session: a running task's pid is a new task's session, never
        swept. Returns the bytes the killed sessions held, which the kernel has yet to give
        back."""
        live = {task.pid for task in self.running.values()}
        dying = 0
        for sid in list(self.sweep_sids):
            if sid in live or (sessions is not None and sid not in sessions) or \
                    not kill_session(sid, signal.SIGKILL):
                self.sweep_sids.discard(sid)
            elif sessions is not None:
                dying += sessions[sid]
        return dying

    def has_room(self) -> bool:
        """Whether a claim could get anything; without room the loop waits for a task to end."""
        free_mem, free_cpu, slots = self.free()
        return slots > 0 and free_mem >= 0 and free_cpu >= 0 and not self.evicting and \
            not self.held and time.monotonic() >= self.fault_until

    def start(self, claims: list[Claim]) -> None:
        for claim in claims:
            old = self.running.get(claim.task_id)
            if old is not None:
                self.supersede(old, claim.attempt)
            task = self.runner.start(claim)
            task.extra["oom0"] = self.oom_count
            self.running[claim.task_id] = task
            if task.spawn_error is not None:
                self.completed(task)
                continue
            # A full results directory lets tasks start and fails them after: only once it has
            # room again is the fault over, or its pause would never grow past the first.
            if self.fault and self.runner.full() is None:
                log.info("tasks start again on %s", self.name)
                self.fault, self.fault_pause = "", 0.0
            self.by_fd[task.pidfd] = task
            self.poller.register(task.pidfd, select.POLLIN)
            log.debug("started %s attempt %d: %s", claim.task_id, claim.attempt, claim.params)

    def supersede(self, old: RunningTask, attempt: int) -> None:
        """The queue took a task away from this worker and gave it back as a new attempt
        before a heartbeat had said so (a requeue of this worker, a lease that expired while
        it was paused): the old run is killed now and leaves ``running``, so that it neither
        runs beside the new one nor is taken for it; its process is reaped when its pidfd says
        it has exited, and its files go then."""
        log.warning("task %s was taken away from this worker and claimed again as attempt %d; "
                    "killing attempt %d", old.task_id, attempt, old.claim.attempt)
        self.runner.kill(old, "lost", 0)
        self.runner.escalate(old)
        del self.running[old.task_id]
        self.evicting.discard(old.task_id)

    def strays(self, inside: dict[int, tuple[int, int]], rss: dict[int, int]) -> None:
        """Processes of the worker's own cgroup (``inside``: pid -> session, rss) in no running
        task's session: they left their task's session (``setsid``), or their task has ended.
        One whose environment names a running task's attempt counts toward that task's memory
        (``rss``, by session); one whose environment is closed to the worker lives while a task
        that ran when it was first seen runs; any other is killed once it has been so at two
        samples in a row: a process in the middle of an ``exec`` shows an empty environment for
        a moment."""
        sessions = {t.pid for t in self.running.values()}
        suspects, self.suspects = self.suspects, set()
        self.veiled = {pid: keepers for pid, keepers in self.veiled.items() if pid in inside}
        for pid, (sid, size) in inside.items():
            if pid in self.lineage or sid in sessions:
                continue
            try:
                owner = task_of(pid)
            except PermissionError:
                # It cannot say its task (ssh-agent started by a task makes itself not
                # dumpable): it lives while a task that ran when it was first seen runs.
                if self.veiled.setdefault(pid, set(self.running)) & self.running.keys():
                    continue
                owner = None
            task = self.running.get(owner[0]) if owner else None
            if task is not None and owner is not None and task.claim.attempt == owner[1]:
                rss[task.pid] = rss.get(task.pid, 0) + size
                continue
            if pid not in suspects:
                self.suspects.add(pid)
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                continue
            log.info("killed process %d, left running by %s", pid,
                     f"task {owner[0]} (attempt {owner[1]})" if owner else "no task it names")

    def annotate(self, task: RunningTask) -> None:
        """Record where the task runs, so that a restarted worker can kill what a crashed one
        left. Done at the first sample after the start, not at the start: reading a process's
        /proc entry while it is still setting itself up waits for it, and short tasks are
        gone before they need it."""
        task.extra["pstart"] = pstart = process_start(task.pid)
        if pstart:
            self.ops.append(("annotate", task,
                             {"pid": task.pid, "host": self.host, "pstart": pstart}))

    # -- completion and reports -------------------------------------------------------------
    def result(self, task: RunningTask) -> dict[str, Any]:
        # On the monotonic clock: a step of the system clock (NTP at a node's boot) between
        # start and end would make the wall time negative or hours long.
        wall = task.ended_mono - task.started_mono
        return {
            "exit_code": "" if task.returncode is None else task.returncode,
            "started": repr(task.started), "ended": repr(task.ended), "wall_s": f"{wall:.3f}",
            "peak_mem": task.peak_rss, "host": self.host,
            "stdout_tail": task.stdout_tail, "stderr_tail": task.stderr_tail,
        }

    def completed(self, task: RunningTask) -> None:
        """Turn an exited task into the report the queue needs."""
        self.running.pop(task.task_id, None)
        self.freed = True
        if task.pid > 0:
            self.sweep_sids.add(task.pid)
        self.evicting.discard(task.task_id)
        res = self.result(task)
        reason = task.kill_reason
        if reason != "evict":
            self.held = False  # a task ended: what it held is room admission can judge
        rc = task.returncode
        if reason in ("shutdown", "lost"):
            self.runner.discard(task)
            return
        # The kernel got there first: the task needs more memory than it had, which is an
        # eviction (requeue with its peak), not a failure of the task. The process it killed
        # may be one the task started (a program under `sh -c "... && ..."`, a pipeline, a
        # pool's worker): then the task ends with the status it makes of that, not SIGKILL.
        oom = False
        if reason is None and rc not in (None, 0):
            # Read now, the count is also the baseline of the tasks claimed into the room this
            # one leaves: the last sample's, older than this kill, made their own failures look
            # like the kernel's doing.
            self.oom_count = max(self.oom_count, oom_kills(self.cgroups))
            oom = self.oom_count > task.extra.get("oom0", 0)
        if task.peak_rss and task.spawn_error is None and reason is None and \
                rc is not None and rc != -signal.SIGKILL and not oom:
            # Only a task that ended on its own reached its real peak: one killed early would
            # make its class look smaller than it is.
            filled = fill(task)
            # The clock of its trace's ages, to the first sample that found it over.
            life = min(task.ended_mono, float(task.extra.get("exited", task.ended_mono))) - \
                task.started_mono
            held = shape(task.trace, life, task.peak_rss) if filled is not None else None
            self.learn(task.claim.declared, task.peak_rss, filled,
                       None if held is None else (life, held))
        if oom:
            if rc == -signal.SIGKILL:
                log.warning("task %s was killed by the kernel OOM killer (peak %s); requeueing",
                            task.task_id, gib(task.peak_rss))
                res["reason"] = "killed by the kernel OOM killer"
            else:
                log.warning("task %s ended (%s) after the kernel OOM killer killed a process of "
                            "it (peak %s); requeueing", task.task_id, _status(rc),
                            gib(task.peak_rss))
                res["reason"] = "a process of it was killed by the kernel OOM killer"
            reason = "evict"
        if reason == "evict":
            self.evicted += 1
            peak = mib(task.peak_rss)
            if task.extra.get("alone") and task.peak_rss >= self.capacity - self.reserve:
                # It can never fit this node, but a larger one may have room: the queue asks
                # for more than this node's room and fails the task only if no live worker
                # has it.
                room = (self.capacity - self.reserve) >> 20
                self.ops.append(("evict", task, (max(peak, room + 1), res, (
                    f"needs more memory than node {self.name} has: peak {peak} MiB while "
                    f"running alone, node capacity {self.capacity >> 20} MiB "
                    f"(reserve {self.reserve >> 20} MiB)"))))
                return
            self.ops.append(("evict", task, (peak, res, "")))
            return
        if reason == "timeout":
            limit = task.extra["timeout"]
            res["reason"] = f"timed out after {limit:g}s (killed)"
            self.ops.append(("fail", task, (res, False)))
            return
        if reason == "cancel":
            res["reason"] = "cancelled"
            self.ops.append(("fail", task, (res, False)))
            return
        if task.spawn_error is not None:
            fault = self.runner.unusable()
            if fault is not None:
                self.node_fault(task, fault, f"{self.name} cannot start tasks: {fault}")
                return
            res["reason"] = task.spawn_error
            res["stderr_tail"] = task.spawn_error
            self.ops.append(("fail", task, (res, True)))
            return
        if rc == 0:
            self.done += 1
            self.ops.append(("finish", task, res))
            return
        if rc is None:
            res["reason"] = "exit status lost: the task's process was reaped outside the worker"
            self.ops.append(("fail", task, (res, True)))
            return
        fault = self.runner.full()
        if fault is not None:
            # Every task would fail writing its output, the whole queue in minutes: a fault of
            # the node, as one that cannot start tasks.
            self.node_fault(task, fault, f"{self.name}: {fault}")
            return
        res["reason"] = _status(rc)
        self.ops.append(("fail", task, (res, True)))

    def node_fault(self, task: RunningTask, fault: str, why: str) -> None:
        """``task`` failed because of this node, not of the task (``Runner.unusable``,
        ``Runner.full``): a failure would use up its retries, and every task this worker claims
        would fail alike, the whole queue in minutes. The task goes back to the queue uncounted,
        with ``why``, and the worker claims nothing for a while, longer at each fault in a row."""
        self.ops.append(("requeue", task, f"requeued: {why}"))
        if time.monotonic() < self.fault_until:
            return
        self.fault = fault
        self.fault_pause = min(FAULT_PAUSES[1], max(FAULT_PAUSES[0], self.fault_pause * 2))
        self.fault_until = time.monotonic() + self.fault_pause
        log.error("cannot start tasks: %s; what was claimed goes back to the queue, and nothing "
                  "is claimed for %gs", fault, self.fault_pause)

    def exchange(self, claim: bool) -> int:
        """Send every pending report and annotation, and with ``claim`` a claim for what is
        free, in one round trip; start the claimed tasks, or if the guard evicted meanwhile
        send them back (``unstarted``). Returns how many were started."""
        if not self.ops and not self.unstarted and not claim:
            return 0
        pipe = self.q.pipeline()
        # Taken now: the guard may add annotations while the pipeline waits (``guard``); they go
        # with the next exchange.
        ops, self.ops = self.ops, []
        kept, self.kept = self.kept, []
        unstarted, self.unstarted = self.unstarted, []
        # First the renames done since the last exchange: a report below may list the same task
        # again (a later attempt, after a retry), and must stay listed.
        if kept:
            self.q.outputs_kept(self.name, kept, client=pipe)
        for c in unstarted:
            self.q.requeue(c.task_id, self.name, c.attempt,
                           f"requeued: claimed by {self.name} while it was short of memory",
                           client=pipe)
        for kind, task, payload in ops:
            assert task is not None
            c = task.claim
            if kind == "annotate":
                self.q.annotate(c.task_id, self.name, c.attempt, payload, client=pipe)
            elif kind == "finish":
                self.q.finish(c.task_id, self.name, c.attempt, payload, client=pipe)
            elif kind == "fail":
                res, retryable = payload
                self.q.fail(c.task_id, self.name, c.attempt, res, retryable, client=pipe)
            elif kind == "requeue":
                self.q.requeue(c.task_id, self.name, c.attempt, payload, client=pipe)
            elif kind == "evict":
                peak, res, no_room = payload
                self.q.evict(
                    c.task_id, self.name, c.attempt, peak, self.wc.eviction_budget,
                    f"evicted from {self.name}: memory short, task peak {peak} MiB",
                    f"evicted {self.wc.eviction_budget + 1} times (eviction budget "
                    f"{self.wc.eviction_budget}); last peak {peak} MiB on {self.name}",
                    res, client=pipe, no_room_reason=no_room)
        if claim:
            outlook = self.outlook()
            free_mem, free_cpu, slots = self.free(outlook)
            self.q.claim(self.name, self.token, free_mem, free_cpu, slots,
                         self.wc.avoid_window, self.claim_charges(outlook, free_mem),
                         client=pipe, sizes=self.charges)
        try:
            replies = pipe.execute()[(1 if kept else 0) + len(unstarted):]
        except BaseException:
            self.ops[:0], self.kept[:0], self.unstarted[:0] = ops, kept, unstarted
            raise
        failed: list[str] = []
        for (kind, task, payload), outcome in zip(ops, replies):
            if kind == "annotate" or task is None:
                continue
            if outcome == 0:
                log.info("report for %s attempt %d rejected: the task was taken over",
                         task.task_id, task.claim.attempt)
                self.runner.discard(task)
            elif outcome == 2:
                # Back in the queue, so not the task's outcome. Renaming these files now could
                # also land after another worker ran the next attempt and kept its files.
                self.runner.discard(task)
                if kind == "fail":
                    log.info("task %s requeued: %s", task.task_id, payload[0].get("reason", ""))
            else:
                self.runner.keep(task)
                self.kept.append(task.task_id)
                if kind != "finish":
                    failed.append(task.task_id)
        started = self.take(replies[-1]) if claim else 0
        if failed:
            # Read back, after the claimed tasks started: a task cancelled meanwhile fails as
            # cancelled, an eviction past its budget with the budget's reason, which only the
            # queue writes. (Pipelined behind the reports, the read would come back from before
            # them whenever Redis had to be sent a script again.)
            for task_id, reason in zip(failed, self.q.reasons(failed)):
                log.info("task %s failed: %s", task_id, reason)
        return started

    def take(self, reply: Any) -> int:
        """Start the tasks of a claim's reply; returns how many were started."""
        claims = self.q.claims(reply)
        if claims is None:
            self.lease_expired = True
            return 0
        if claims and (self.evicting or self.held):
            # The guard evicted while the claim waited (``guard``): the claim measured memory
            # from before, and the victims' memory is not free yet.
            log.info("memory ran short while claiming: putting %d claimed task(s) back in the "
                     "queue unstarted", len(claims))
            self.unstarted = claims
            return 0
        self.start(claims)
        return len(claims)

    # -- heartbeat --------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {
            "hb": repr(time.time()), "running": len(self.running), "fault": self.fault,
            "cores_used": sum(t.claim.cpu for t in self.running.values()),
            "mem_used": max(0, self.capacity - self.available), "mem_avail": self.available,
            "tasks_rss": self.tasks_rss, "done": self.done, "evicted": self.evicted,
        }

    def heartbeat(self) -> None:
        beat = self.q.heartbeat(self.name, self.token, self.ttl_ms, self.stats())
        if beat.status == 0:
            raise LeaseLost(self.name)
        if beat.status == 2:
            log.warning("lease of %s had expired (paused or cut off from Redis?); renewed",
                        self.name)
            # The lease can be gone with everything else of the name (a purge, a Redis that came
            # back empty): the record says how big this node is (evictions judge by it) and
            # what to clean up if it dies, and the registration restores the outage guard.
            self.q.register(self.name, self.token, self.ttl_ms,
                            {**self.info(), **self.stats()}, force=True)
        if beat.stop_time > self.registered and not self.stop_requested:
            log.info("stop requested: finishing running tasks, then exiting")
            self.stop_requested = self.stopping = True
        for tid in beat.cancel:
            if tid in self.running and not self.runner.exited(self.running[tid]):
                self.runner.kill(self.running[tid], "cancel", self.wc.kill_grace)
        for tid, task in self.running.items():
            if tid not in beat.running and task.kill_reason is None and task.returncode is None:
                log.warning("task %s was taken away from this worker; killing it", tid)
                self.runner.kill(task, "lost", self.wc.kill_grace)
        # A claim whose reply was lost (the connection broke after Redis ran it) lists tasks as
        # running here that this instance never started; while the lease lives nobody else
        # would requeue them. Tasks with a report still waiting in self.ops, or going back
        # unstarted, are ours.
        known = set(self.running) | {t.task_id for _, t, _ in self.ops if t is not None} | \
            {c.task_id for c in self.unstarted}
        for tid in beat.running - known:
            attempt = int((self.q.task(tid) or {}).get("attempt", 0) or 0)
            log.warning("task %s is listed as running here but was never started (claim reply "
                        "lost?); putting it back in the queue", tid)
            self.q.requeue(tid, self.name, attempt,
                           f"requeued: worker {self.name} never received its claim")
        reaped = self.q.reap(self.runner.results, self.host)
        for tid, pid, pstart in reaped.orphans:
            kill_orphan(tid, pid, pstart)
        self.take_over_outputs(reaped)

    def take_over_outputs(self, reaped: Reaped) -> None:
        """Workers whose lease expired and who wrote to this results directory: the outcomes
        they reported get their files (they may have died before renaming them), and the
        attempts they were running, now requeued, leave none."""
        renamed: dict[str, list[str]] = {}
        for worker, tid, attempt in reaped.keep:
            if self.runner.keep_attempt(tid, attempt):
                renamed.setdefault(worker, []).append(tid)
        for tid, attempt in reaped.drop:
            self.runner.discard_attempt(tid, attempt)
        for worker, ids in renamed.items():
            log.info("renamed the output files of %d task(s) whose outcome worker %s recorded "
                     "before its lease expired", len(ids), worker)
            self.q.outputs_kept(worker, ids)

    # -- the loop ---------------------------------------------------------------------------
    def requeue_all(self) -> None:
        """Stop now: running tasks go back to the queue and their processes are killed.

        If Redis cannot be reached the tasks are killed anyway; deregistering requeues them, or
        if Redis is still away then, the reaper once the lease expires: nothing is lost. A task
        that has already ended on its own is left to be reaped and reported as it ended."""
        mine = []
        for task in self.running.values():
            if self.runner.exited(task):
                continue
            if task.kill_reason is None:
                mine.append(task)
            self.runner.kill(task, "shutdown", self.wc.kill_grace)
        try:
            pipe = self.q.pipeline()
            for task in mine:
                self.q.requeue(task.task_id, self.name, task.claim.attempt,
                               f"requeued: worker {self.name} was stopped", client=pipe)
            pipe.execute()
        except (ConnectError, RefusedError) as exc:
            log.warning("could not requeue %d task(s) (%s); they go back to the queue when "
                        "this worker deregisters, or else when its lease expires", len(mine), exc)

    def abandon(self) -> None:
        """The loop failed: what runs goes back to the queue as on a stop (``requeue_all``),
        and its processes get the grace period to end, then are killed, so none runs on after
        the worker exits. What had ended and waits to be reported goes back to the queue when
        the lease expires, as a dead worker's tasks do."""
        try:
            self.requeue_all()
        finally:
            deadline = time.monotonic() + self.wc.kill_grace
            for task in self.running.values():
                if task.pidfd >= 0:
                    ending = select.poll()
                    ending.register(task.pidfd, select.POLLIN)
                    ending.poll(max(0.0, deadline - time.monotonic()) * 1000)
                self.runner.escalate(task)
            self.sweep()

    def check_deadlines(self, mono: float) -> None:
        for task in self.running.values():
            if task.kill_deadline is not None and mono >= task.kill_deadline:
                self.runner.escalate(task)
                task.kill_deadline = mono + 1.0
            limit = task.claim.timeout_s or self.wc.default_timeout
            if limit and task.kill_reason is None and mono - task.started_mono > limit and \
                    not self.runner.exited(task):
                task.extra["timeout"] = limit
                self.runner.kill(task, "timeout", self.wc.kill_grace)

    def reap_children(self) -> None:
        """Collect the tasks whose pidfds said they exited during the last poll."""
        ready, self._ready_fds = self._ready_fds, set()
        for fd in ready:
            task = self.by_fd.get(fd)
            if task is None or not self.runner.try_reap(task):
                continue
            self.poller.unregister(fd)
            del self.by_fd[fd]
            if self.running.get(task.task_id) is task:
                self.completed(task)
            else:
                self.runner.discard(task)  # superseded (``supersede``): reported by nobody

    def run(self) -> int:
        # Handlers first: a stop signal between taking the name and installing them killed
        # the worker, and its lease held the name for a term after.
        self.prepare_process()
        self.install_signals()
        if not self.register():
            log.info("worker %s stopped before it could take its name", self.name)
            return 0
        log.info("worker %s up: %g cores, %s memory, %s of it for tasks (reserve %s, evict "
                 "below %s%s), results in %s, tasks run in %s unless they give a cwd",
                 self.name, self.cores, gib(self.capacity),
                 gib(max(0, self.capacity - self.reserve)), gib(self.reserve),
                 gib(self.evict_below),
                 f", overcommit {self.wc.overcommit}" if self.wc.overcommit != 1 else "",
                 self.wc.results_dir, self.runner.workdir)
        if self.cgroup_procs:
            log.info("tasks are also tracked by this worker's cgroup (%s): processes that "
                     "leave a task's session count toward it and die once it ends",
                     self.cgroup_procs.parent)
        threading.Thread(target=self.listen, name="notices", daemon=True).start()
        try:
            with self._state:
                self._loop_thread = threading.get_ident()
                threading.Thread(target=self.guard, name="guard", daemon=True).start()
                try:
                    self.loop()
                finally:
                    self._loop_thread = None
                    self._loop_over.set()
        except LeaseLost:
            log.error("worker name %s was taken over by another instance; stopping and killing "
                      "this instance's tasks", self.name)
            for task in self.running.values():
                self.runner.kill(task, "lost", 0)
                self.runner.escalate(task)
            self.sweep()
            return 1
        except Exception:
            log.critical("unexpected error; putting %d running task(s) back in the queue, "
                         "killing them and exiting", len(self.running), exc_info=True)
            self.abandon()
            raise
        # What the last tasks left gets no sample after this one.
        self.sweep()
        try:
            left = self.q.deregister(self.name, self.token, self.stats())
            if left > 0:
                log.warning("%d task(s) were still listed as running here; they went back to "
                            "the queue", left)
        except (ConnectError, RefusedError) as exc:
            log.warning("could not deregister (%s); the lease will expire", exc)
        log.info("worker %s stopped", self.name)
        return EXIT_STOPPED if self.stop_requested and not self.fast_stop else 0

    def loop(self) -> None:
        """Until the worker stops: reap, sample, heartbeat, report and claim, then wait for the
        next of these to be due, a task to exit or a notice."""
        hb_every = max(0.5, self.wc.heartbeat_ttl / 4)
        mono = time.monotonic()
        next_hb = next_claim = mono
        requeued = False
        while True:
            mono = time.monotonic()
            self.reap_children()
            if self.sample_due(mono):
                self.sample()
                if self.room_grew():
                    next_claim = mono
            self.check_deadlines(mono)
            try:
                if self.fast_stop and not requeued:
                    self.requeue_all()
                    requeued = True
                if mono >= next_hb or self.lease_expired:
                    self.lease_expired = False
                    self.heartbeat()
                    next_hb = mono + hb_every
                    # Only a call that reached Redis says so: a pass that made none (the
                    # retry is a second away) proves nothing.
                    if self.redis_down_since is not None:
                        log.info("Redis answers again after %.1fs",
                                 mono - self.redis_down_since)
                        self.redis_down_since = None
                if self.freed:
                    self.freed, next_claim = False, mono
                    self.refresh_after_exit()
                if self.noticed:
                    self.noticed, next_claim = False, mono
                claim = not self.stopping and mono >= next_claim and self.has_room()
                if self.exchange(claim):
                    next_claim = mono
                elif claim and not self.unstarted:
                    # Nothing came: new tasks are announced (``listen``), so only what no
                    # notice covers waits for this poll (an avoid window running out,
                    # memory freed outside the tasks, and for --exit-when-empty the last
                    # tasks of other workers ending).
                    wait = min(self.wc.idle_poll, 1.0) if self.exit_when_empty \
                        else self.wc.idle_poll
                    next_claim = mono + wait
                    self.claimed_nothing()
                    log.debug("claim came back empty; next claim in %gs unless tasks are "
                              "announced%s", wait, "" if self.short_at is None else
                              " or memory frees up")
                    if self.exit_when_empty and not self.running and self._empty():
                        break
            except (ConnectError, RefusedError, AuthError) as exc:
                # A Redis restarted with another password is waited out like one away: the
                # running tasks are worth more than the time to set the passwords right again.
                if self.redis_down_since is None:
                    self.redis_down_since = mono
                    log.warning("%s (%s); tasks keep running, reports wait",
                                "Redis refuses writes" if isinstance(exc, RefusedError)
                                else "Redis refuses this worker's password"
                                if isinstance(exc, AuthError) else "cannot reach Redis", exc)
                next_hb = next_claim = mono + 1.0
            if self.stopping and not self.running and not self.ops and not self.unstarted:
                break
            wake = min(self.next_sample(), next_hb,
                       next_claim if not self.stopping and self.has_room() else next_hb,
                       *(t.kill_deadline for t in self.running.values()
                         if t.kill_deadline is not None))
            self._poll(max(0.0, wake - time.monotonic()))

    def _poll(self, timeout: float) -> None:
        for fd, _ in self.poller.poll(timeout * 1000):
            if fd == self._wake_r:
                _drain(self._wake_r)
            elif fd == self._notice_r:
                _drain(self._notice_r)
                self.noticed = True
            elif fd in self.by_fd:
                self._ready_fds.add(fd)

    def _empty(self) -> bool:
        counts = self.q.counts()
        return counts["todo"] == 0 and counts["running"] == 0


def withheld_from_tasks(cfg: Config) -> tuple[str, ...]:
    """The worker's environment variables its tasks do not get: the Redis password, the Redis
    URL when it holds one, redis-cli's REDISCLI_AUTH, and any other variable holding the
    password. A task that runs the CLI itself reads the config file."""
    names = ["DISTCOMP_REDIS_PASSWORD", "REDISCLI_AUTH"]
    url = os.environ.get("DISTCOMP_REDIS_URL", "")
    if url and Config(url=url).redacted_url() != url:
        names.append("DISTCOMP_REDIS_URL")
    if cfg.password:
        names.extend(k for k, v in os.environ.items() if cfg.password in v and k not in names)
    return tuple(names)


def not_dumpable() -> None:
    """Make this process's /proc files root's: a task runs as the worker's user, and read the
    password the worker was given in its environment from /proc/PPID/environ. Tasks are
    dumpable again once they exec (prctl(2), PR_SET_DUMPABLE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("cannot make the worker not dumpable (%s): its tasks can read its "
                    "environment", os.strerror(ctypes.get_errno()))


# The worker's numeric settings: (name, lowest allowed value, what 0 means or "" when the lowest
# is the meaning). Each is checked before anything starts: a negative core count or a NaN TTL
# would otherwise start a worker that never takes a task, or fail deep inside Redis.
SETTING_FLOORS = (
    ("cores", 0, "all usable cores"), ("max_tasks", 0, "16 per core"),
    ("default_timeout", 0, "no timeout"), ("heartbeat_ttl", 1, ""),
    ("eviction_budget", 0, ""), ("kill_grace", 0, ""), ("sample_interval", 0.01, ""),
    ("tail_bytes", 0, ""), ("avoid_window", 0, ""), ("idle_poll", 0.05, ""),
    ("memory_limit", 0, "the node's memory"),
)


def check_settings(wc: WorkerConfig) -> None:
    """Refuse settings a worker cannot run with, each with a one-line reason."""
    if not wc.name or not wc.name.isprintable() or any(c in wc.name for c in ",# "):
        raise ConfigError(f"worker name {wc.name!r} must be non-empty, printable and without ',', "
                          f"'#' or blanks (the queue keeps names in lists separated by commas "
                          f"and in marks separated by '#')")
    for name, low, zero in SETTING_FLOORS:
        value = getattr(wc, name)
        if not (math.isfinite(value) and value >= low):
            what = f"at least {low:g}" + (f" (0: {zero})" if zero else "")
            raise ConfigError(f"{name} must be a number {what}, got {value:g}")
    check_overcommit(wc.overcommit)


def check_overcommit(value: float | str) -> None:
    low, high = OVERCOMMIT_RANGE
    if value != OVERCOMMIT_AUTO and not (
            isinstance(value, (int, float)) and low <= value <= high):
        raise ConfigError(f"overcommit must be between {low:g} and {high:g} or "
                          f"{OVERCOMMIT_AUTO!r}, got {value}")


def fill(task: RunningTask) -> float | None:
    """How much of its peak a task held over its measured life (memory-seconds / (peak x
    life)), or None when too few samples saw it to tell."""
    life = task.seen - task.started_mono
    if task.samples < FILL_SAMPLES or not task.peak_rss or life <= 0:
        return None
    return min(1.0, task.mem_s / (task.peak_rss * life))


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def _poke(fd: int) -> None:
    try:
        os.write(fd, b"!")
    except BlockingIOError:
        pass  # the pipe is full: the loop has a wake-up waiting already


def _status(rc: int) -> str:
    """How a task's process ended, as its record says it."""
    return f"killed by {signal_name(-rc)}" if rc < 0 else f"exit code {rc}"


def _alive(info: dict[str, str]) -> bool:
    try:
        return _same_process(int(info.get("pid", 0)), info.get("pstart", ""))
    except ValueError:
        return False


def kill_orphan(task_id: str, pid: int, pstart: str) -> None:
    """Kill the session of a task's process that a dead worker left running on this host, if
    ``pid`` is still that process."""
    if _same_process(pid, pstart):
        n = kill_session(pid, signal.SIGKILL)
        log.info("killed %d orphan process(es) of task %s", n, task_id)


def _same_process(pid: int, pstart: str) -> bool:
    """True if ``pid`` is still the process that started at ``pstart`` (not a reused pid)."""
    return pid > 0 and bool(pstart) and process_start(pid) == pstart
