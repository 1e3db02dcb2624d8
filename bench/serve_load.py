"""Load on the web demo's API, on loopback: latency and throughput, then a hostile mix of uploads.

    python bench/serve_load.py                 # a fresh EfficientNet-Lite0 bundle (ImageNet weights, new head)
    python bench/serve_load.py runs/my-run     # your own run folder (exported to ONNX if it is not yet)
    python bench/serve_load.py --mix hostile   # only the hostile mix (about a minute and a half)

Each server is `imgtune serve` in a subprocess on 127.0.0.1 (a free port), so that its memory can be read.

normal: for the PyTorch and the ONNX Runtime backends, two servers side by side, one classifying
each request alone (`--no-batching`) and one gathering concurrent requests into batches (the
default micro-batching: `--max-batch 16 --batch-wait-ms 10`, or --max-batch / --batch-wait-ms), both
with `--max-concurrent` as large as the clients (no 503). In each of --rounds rounds (default 2,
to see the noise of a shared machine), 200 POST /api/predict requests of a 640x480 JPEG (cam=false:
prediction only) from 8 concurrent clients and then from 1, to one server and then the other; then
one pass with cam=true (Grad-CAM, never batched) on the batching server. Each client thread keeps
its connection open (keep-alive), as a real client would. Every answer must be 200. Reported per
row: p50/p99 latency, requests/s, errors, the mean batch the answers say they shared and the
server's CPU time per request (user + system, all threads: what a request costs, which depends much
less than requests/s on what else a shared machine runs); per backend and round, the speed-up of
micro-batching at 8 clients (requests/s batched / alone) and its CPU saving (CPU per request alone
/ batched).

hostile: one server as `imgtune serve` starts it by default (backend auto, `--max-concurrent` twice
the cores unless given). 8 clients send the JPEG (cam=false; on 503 they wait the Retry-After and
try again) while 3 others cycle through uploads over the 10 MB limit (announced by Content-Length,
and streamed without one), a 6300 x 6300 16-bit PNG (40 megapixels in 90 kB), a truncated JPEG and
a slow-loris upload (a small PNG sent 16 bytes at a time over about 5 s); these 11 clients run at
nice 10, below the server. A separate process asks /api/health every 50 ms throughout. Bounded: 45 s
or 1000 normal requests, whichever comes first, then the hostile clients finish what they are
sending. Reported: the statuses per kind, server errors (any 5xx but the intended 503 busy, or a
connection the server broke on a normal request), health latency (max must be <= 100 ms; the
slowest checks with the uploads in flight then), the server's peak resident memory during the mix
(VmHWM), and requests/s and p50/p99 of the normal requests answered 200.

Results go to bench/results/serve-load-<date>.json. A benchmark, not a test: numbers depend on the
machine; all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent

#: The statuses each kind of upload may get; anything else is reported as unexpected.
EXPECTED = {"normal": {200, 503}, "oversized": {413}, "oversized-chunked": {413}, "png-16-bit": {200, 503},
            "truncated-jpeg": {400, 503}, "slow-loris": {200, 503}}
HOSTILE_KINDS = ("oversized", "png-16-bit", "truncated-jpeg", "slow-loris", "oversized-chunked")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_bundle(folder: Path) -> Path:
    """An EfficientNet-Lite0 bundle with its offline ImageNet weights and a 3-class head (untrained)."""
    from imgtune import Learner, load_data

    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        (folder / "data" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "data" / name / f"{i}.png")
    learner = Learner.from_data(load_data(folder / "data", valid_pct=0.25), progress=False, num_workers=0)
    learner.save(folder / "run")
    return folder / "run"


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def photo_bytes() -> bytes:
    rng = np.random.default_rng(1)
    return encoded(Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)), "JPEG", quality=90)


def hostile_bodies() -> dict[str, bytes]:
    """The files of the hostile mix (the oversized bodies are made as they are sent)."""
    side = 6300
    ramp = np.linspace(0, 65535, side).astype(np.uint16)
    deep = encoded(Image.fromarray(np.broadcast_to(ramp, (side, side)).copy()), "PNG", compress_level=9)
    photo = photo_bytes()
    small = encoded(Image.fromarray(np.random.default_rng(2).integers(0, 255, (32, 32, 3), dtype=np.uint8)), "PNG")
    return {"png-16-bit": deep, "truncated-jpeg": photo[: len(photo) // 2], "slow-loris": small}


class Server:
    """`imgtune serve` in a subprocess on a free loopback port; its log goes to a temporary file."""

    def __init__(self, run_dir: Path, backend: str, max_concurrent: int | None, options: tuple[str, ...] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        command = [sys.executable, "-m", "imgtune", "serve", str(run_dir), "--host", "127.0.0.1",
                   "--port", str(self.port), "--backend", backend]
        if max_concurrent:
            command += ["--max-concurrent", str(max_concurrent)]
        command += list(options)
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if httpx.get(f"{self.url}/api/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"imgtune serve did not start; its log: {Path(self.log.name).read_text()[-2000:]}")

    def memory(self, key: str) -> int:
        """``VmRSS`` or ``VmHWM`` (peak) of the server process, in bytes."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def cpu_seconds(self) -> float:
        """CPU time (user + system, all its threads) the server process has used so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def reset_peak(self) -> None:
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")  # VmHWM starts again from VmRSS

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
        os.unlink(self.log.name)


# --- the normal load ------------------------------------------------------------------------------


def load(url: str, body: bytes, *, requests: int, clients: int, cam: bool) -> dict:
    """``requests`` POSTs of ``body`` from ``clients`` threads, each with its own kept-alive connection."""
    todo, lock = iter(range(requests)), threading.Lock()

    def client_thread() -> list[tuple[int, float, int]]:
        done = []
        with httpx.Client(timeout=60) as client:
            while True:
                with lock:
                    if next(todo, None) is None:
                        return done
                started = time.perf_counter()
                try:
                    response = client.post(url, params={"cam": str(cam).lower()},
                                           files={"file": ("photo.jpg", body, "image/jpeg")})
                except httpx.HTTPError:  # no answer within the client's 60 s: an error, not a crash
                    done.append((0, time.perf_counter() - started, 0))
                    continue
                batch = response.json().get("batch", 1) if response.status_code == 200 else 0
                done.append((response.status_code, time.perf_counter() - started, batch))

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [row for rows in pool.map(lambda _: client_thread(), range(clients)) for row in rows]
    wall = time.perf_counter() - started
    ok = [batch for status, _, batch in results if status == 200]
    return dict(requests=requests, clients=clients, cam=cam, errors=sum(status != 200 for status, *_ in results),
                requests_per_s=requests / wall, mean_batch=sum(ok) / max(1, len(ok)),
                **percentiles([seconds for _, seconds, _ in results]))


def percentiles(seconds: list[float]) -> dict:
    ordered = sorted(seconds) or [float("nan")]
    return dict(p50_ms=1000 * statistics.median(ordered), p99_ms=1000 * ordered[int(0.99 * (len(ordered) - 1))])


def normal_rows(run_dir: Path, backend: str, body: bytes, args) -> list[dict]:
    """The rows of one backend: alone vs batched, 8 and 1 clients, per round; then Grad-CAM."""
    batching = ("--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms))
    servers = {"alone": Server(run_dir, backend, args.clients, ("--no-batching",)),
               "batched": Server(run_dir, backend, args.clients, batching)}
    try:
        for server in servers.values():
            load(f"{server.url}/api/predict", body, requests=16, clients=args.clients, cam=False)  # warm-up
        rows = []
        for round_ in range(1, args.rounds + 1):
            for clients in (args.clients, 1):
                for mode, server in servers.items():
                    rows.append(normal_row(server, body, backend, mode, round_, clients, False, args))
        rows.append(normal_row(servers["batched"], body, backend, "batched", 1, args.clients, True, args))
        return rows
    finally:
        for server in servers.values():
            server.stop()


def normal_row(server: Server, body: bytes, backend: str, mode: str, round_: int, clients: int, cam: bool,
               args) -> dict:
    cpu = server.cpu_seconds()
    row = dict(mix="normal", backend=backend, mode=mode, round=round_, load_average=os.getloadavg()[0],
               **load(f"{server.url}/api/predict", body, requests=args.requests, clients=clients, cam=cam))
    # CPU time per request: what a request costs the server, much less sensitive than requests/s to
    # what else the machine runs (on a busy one, a server with more runnable threads gets more CPU).
    row["server_cpu_ms_per_request"] = 1000 * (server.cpu_seconds() - cpu) / args.requests
    print(f"{backend:<6} {mode:<8} round {round_} cam={str(cam):<5} {row['clients']} clients: {row['errors']} errors, "
          f"p50 {row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms, {row['requests_per_s']:.1f} requests/s, "
          f"mean batch {row['mean_batch']:.1f}, server CPU {row['server_cpu_ms_per_request']:.0f} ms/request "
          f"(load {row['load_average']:.1f})", flush=True)
    return row


def speedups(rows: list[dict], clients: int) -> list[dict]:
    """Per backend and round: batched requests/s over alone at ``clients`` clients, and the targets."""
    found = []
    for backend in dict.fromkeys(r["backend"] for r in rows if r["mix"] == "normal"):
        for round_ in sorted({r["round"] for r in rows if r["mix"] == "normal"}):
            pick = {r["mode"]: r for r in rows if r["mix"] == "normal" and r["backend"] == backend
                    and r["round"] == round_ and r["clients"] == clients and not r["cam"]}
            if {"alone", "batched"} <= set(pick):
                batched, alone = pick["batched"], pick["alone"]
                ratio = batched["requests_per_s"] / alone["requests_per_s"]
                met = dict(speedup_1_6=ratio >= 1.6, requests_per_s_40=batched["requests_per_s"] >= 40,
                           p99_400_ms=batched["p99_ms"] <= 400, no_errors=batched["errors"] == 0)
                cpu = alone.get("server_cpu_ms_per_request", 0) / max(1e-9, batched.get("server_cpu_ms_per_request", 0))
                found.append(dict(backend=backend, round=round_, clients=clients, speedup=ratio, cpu_saving=cpu,
                                  targets_met=met))
                print(f"{backend:<6} round {round_}: micro-batching x{ratio:.2f} requests/s at {clients} clients "
                      f"({alone['requests_per_s']:.1f} -> {batched['requests_per_s']:.1f}), x{cpu:.2f} less server CPU "
                      f"per request")
    return found


# --- the hostile mix ------------------------------------------------------------------------------


def multipart(data: bytes, name: str) -> tuple[bytes, str]:
    boundary = "imgtune-bench-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def raw_post(port: int, body_chunks, length: int, content_type: str, *, pause: float = 0.0,
             read_first: bool = False) -> str:
    """POST /api/predict over a plain socket: the status code as text, or why there was none.

    ``pause``: seconds between chunks (slow-loris); ``read_first``: read the answer before sending
    the body, as a client does that waits for ``100 Continue`` (the oversized upload).
    """
    head = (f"POST /api/predict?cam=false HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        if not read_first:
            for chunk in body_chunks:
                sock.sendall(chunk)
                time.sleep(pause)
        answer = sock.recv(4096).decode("latin-1")
    return answer.split(" ", 2)[1] if answer.startswith("HTTP/") else "no answer"


def hostile_upload(kind: str, port: int, bodies: dict[str, bytes], limit: int) -> str:
    """Send one upload of ``kind``; the status code as text, or the kind of failure."""
    try:
        if kind == "oversized":
            body, content_type = multipart(b"\0" * (limit + 1_000_000), "big.png")
            return raw_post(port, [body], len(body), content_type, read_first=True)
        if kind == "slow-loris":
            body, content_type = multipart(bodies[kind], "slow.png")
            chunks = [body[i:i + 16] for i in range(0, len(body), 16)]
            return raw_post(port, chunks, len(body), content_type, pause=5.0 / len(chunks))
        with httpx.Client(timeout=60) as client:
            if kind == "oversized-chunked":  # no Content-Length: refused as the body streams past the limit
                body, content_type = multipart(b"\0" * (limit + 1_000_000), "big.png")
                chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))
                response = client.post(f"http://127.0.0.1:{port}/api/predict", content=chunks,
                                       headers={"content-type": content_type})
            else:
                response = client.post(f"http://127.0.0.1:{port}/api/predict", params={"cam": "false"},
                                       files={"file": (f"{kind}.bin", bodies[kind], "application/octet-stream")})
            return str(response.status_code)
    except (OSError, httpx.HTTPError) as error:
        return f"client error {type(error).__name__}"


def normal_client(url: str, body: bytes, todo: list, deadline: float, record) -> None:
    """Send the JPEG until ``todo`` is empty or the deadline passes; on 503 wait its Retry-After."""
    with httpx.Client(timeout=60) as client:
        while todo and time.monotonic() < deadline:
            try:
                todo.pop()
            except IndexError:
                return
            started = time.perf_counter()
            try:
                response = client.post(url, params={"cam": "false"}, files={"file": ("photo.jpg", body, "image/jpeg")})
            except httpx.HTTPError as error:
                record("normal", f"client error {type(error).__name__}", time.perf_counter() - started)
                continue
            record("normal", str(response.status_code), time.perf_counter() - started)
            if response.status_code == 503:
                time.sleep(min(5.0, float(response.headers.get("retry-after", "1"))))


def monitor(url: str) -> None:
    """``--monitor URL``: GET URL every 50 ms until stdin closes, then print the latencies as JSON."""
    latencies, failures, slow = [], 0, []
    with httpx.Client(timeout=10) as client:
        while not select.select([sys.stdin], [], [], 0)[0]:
            started = time.perf_counter()
            try:
                failures += client.get(url).status_code != 200
            except httpx.HTTPError:
                failures += 1
            latencies.append(time.perf_counter() - started)
            if latencies[-1] > 0.05:
                slow.append((time.time(), latencies[-1]))
            time.sleep(max(0.0, 0.05 - (time.perf_counter() - started)))
    print(json.dumps(dict(latencies=latencies, failures=failures, slow=slow)))


def hostile_row(run_dir: Path, args) -> dict:
    bodies, photo = hostile_bodies(), photo_bytes()
    server = Server(run_dir, args.hostile_backend, max_concurrent=args.max_concurrent)
    outcomes, lock, rss = [], threading.Lock(), []

    def record(kind, status, seconds):
        with lock:
            outcomes.append((kind, status, seconds, time.time() - seconds))

    try:
        load(f"{server.url}/api/predict", photo, requests=8, clients=2, cam=False)  # warm-up
        before = server.memory("VmRSS")
        server.reset_peak()
        health = subprocess.Popen([sys.executable, __file__, "--monitor", f"{server.url}/api/health"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)  # the monitor is running before the load begins
        # The clients' threads (started below, from this thread) run at a lower priority than the server
        # and the monitor, which started at ours: on a small machine they would otherwise take the CPU
        # from what they measure, where real clients are elsewhere. Linux: nice is per thread.
        os.nice(10)
        started = time.perf_counter()
        deadline, todo, stop = time.monotonic() + args.hostile_seconds, list(range(args.hostile_requests)), threading.Event()

        def hostile_client(offset):
            for i in range(offset, 10**6):
                if stop.is_set():
                    return
                kind = args.hostile_kinds[i % len(args.hostile_kinds)]
                t = time.perf_counter()
                record(kind, hostile_upload(kind, server.port, bodies, limit=10_000_000), time.perf_counter() - t)

        with ThreadPoolExecutor(max(1, args.clients + args.hostile_clients)) as pool:
            hostile = [pool.submit(hostile_client, k) for k in range(args.hostile_clients)]
            normal = [pool.submit(normal_client, f"{server.url}/api/predict", photo, todo, deadline, record)
                      for _ in range(args.clients)]
            while time.monotonic() < deadline and not (normal and all(f.done() for f in normal)):
                rss.append(server.memory("VmRSS"))
                time.sleep(0.05)
            normal_wall = time.perf_counter() - started
            stop.set()
            for future in hostile + normal:
                future.result()
        health_report = json.loads(health.communicate("", timeout=60)[0])
        peak = max(server.memory("VmHWM"), *rss)
    finally:
        server.stop()
    return summarise(outcomes, health_report, normal_wall, time.perf_counter() - started, before, peak, args)


def summarise(outcomes, health, normal_wall, wall, before, peak, args) -> dict:
    by_kind = {}
    for kind, status, *_ in outcomes:
        by_kind.setdefault(kind, {}).setdefault(status, 0)
        by_kind[kind][status] += 1
    server_errors = sum(n for kind, statuses in by_kind.items() for status, n in statuses.items()
                        if (status.isdigit() and int(status) >= 500 and status != "503")
                        or (kind == "normal" and not status.isdigit()))
    unexpected = sum(n for kind, statuses in by_kind.items() for status, n in statuses.items()
                     if not status.isdigit() or int(status) not in EXPECTED[kind])
    ok = [seconds for kind, status, seconds, _ in outcomes if kind == "normal" and status == "200"]
    latencies = health["latencies"]
    return dict(mix="hostile", backend=args.hostile_backend, max_concurrent=args.max_concurrent or "default",
                clients=args.clients, hostile_clients=args.hostile_clients, clients_nice=10, seconds=wall,
                cores=len(os.sched_getaffinity(0)), load_average=os.getloadavg()[0],
                cpu_pressure_avg60=cpu_pressure(), statuses=by_kind,
                server_errors=server_errors, unexpected=unexpected,
                normal=dict(answered_200=len(ok), busy_503=by_kind.get("normal", {}).get("503", 0),
                            requests_per_s=len(ok) / normal_wall, **percentiles(ok)),
                health=dict(checks=len(latencies), failures=health["failures"], max_ms=1000 * max(latencies),
                            **percentiles(latencies)),
                server_rss_mb=dict(before=before / 1e6, peak=peak / 1e6),
                slow_health=[dict(ms=1000 * seconds, in_flight=in_flight(outcomes, at, seconds))
                             for at, seconds in health["slow"]])


def cpu_pressure() -> float | None:
    """The share of the last minute (%) in which some task here waited for a CPU (Linux PSI), if known."""
    try:
        return float(Path("/proc/pressure/cpu").read_text().split()[2].split("=")[1])
    except (OSError, IndexError, ValueError):
        return None


def in_flight(outcomes, at: float, seconds: float) -> dict:
    """How many uploads of each kind were being sent or answered during a health check that ended at ``at``."""
    counts = {}
    for kind, _, took, started in outcomes:
        if started < at and started + took > at - seconds:
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def print_hostile(row: dict) -> None:
    print(f"hostile ({row['backend']}, max-concurrent {row['max_concurrent']}, {row['clients']} + "
          f"{row['hostile_clients']} clients, {row['seconds']:.0f} s, {row['cores']} cores, CPU pressure "
          f"{row['cpu_pressure_avg60']}%): {row['server_errors']} server errors, {row['unexpected']} unexpected statuses")
    for kind, statuses in row["statuses"].items():
        print(f"  {kind:<18} " + ", ".join(f"{status}: {n}" for status, n in sorted(statuses.items())))
    normal, health, rss = row["normal"], row["health"], row["server_rss_mb"]
    print(f"  normal: {normal['answered_200']} answered, {normal['busy_503']} busy, p50 {normal['p50_ms']:.0f} ms, "
          f"p99 {normal['p99_ms']:.0f} ms, {normal['requests_per_s']:.1f} requests/s")
    print(f"  health: {health['checks']} checks, {health['failures']} failed, p50 {health['p50_ms']:.1f} ms, "
          f"p99 {health['p99_ms']:.1f} ms, max {health['max_ms']:.1f} ms")
    print(f"  server memory: {rss['before']:.0f} MB before, peak {rss['peak']:.0f} MB")
    for slow in sorted(row["slow_health"], key=lambda s: -s["ms"])[:5]:
        print(f"  a slow health check: {slow['ms']:.0f} ms, in flight: {slow['in_flight']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", nargs="?")
    parser.add_argument("--mix", choices=["normal", "hostile", "both"], default="both")
    parser.add_argument("--requests", type=int, default=200, help="normal: requests per pass")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="normal: rounds of alone vs batched")
    parser.add_argument("--backends", type=lambda text: text.split(","), default=["torch", "onnx"],
                        help="normal: the backends, comma-separated")
    parser.add_argument("--max-batch", type=int, default=16, help="normal: the batching server's --max-batch")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0, help="normal: its --batch-wait-ms")
    parser.add_argument("--hostile-requests", type=int, default=1000, help="hostile: normal requests sent at most")
    parser.add_argument("--hostile-seconds", type=float, default=45.0, help="hostile: at most this long")
    parser.add_argument("--hostile-clients", type=int, default=3)
    parser.add_argument("--hostile-backend", default="auto")
    parser.add_argument("--max-concurrent", type=int, help="hostile: the server's cap (default: its own)")
    parser.add_argument("--hostile-kinds", type=lambda text: text.split(","), default=list(HOSTILE_KINDS),
                        help="hostile: the uploads the hostile clients cycle through (default: all)")
    parser.add_argument("--monitor", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.monitor:
        return monitor(args.monitor) or 0
    from imgtune.deploy.export import export_onnx

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.run_dir) if args.run_dir else make_bundle(Path(tmp))
        if not (run_dir / "model.onnx").exists():
            export_onnx(run_dir)
        if args.mix in ("normal", "both"):
            body = photo_bytes()
            for backend in args.backends:
                rows += normal_rows(run_dir, backend, body, args)
        if args.mix in ("hostile", "both"):
            rows.append(hostile_row(run_dir, args))
            print_hostile(rows[-1])
    out = HERE / "results" / f"serve-load-{datetime.now():%Y%m%d-%H%M%S}.json"
    record = dict(rows=rows, speedups=speedups(rows, args.clients), cores=len(os.sched_getaffinity(0)),
                  cpu_pressure_avg60=cpu_pressure(), date=datetime.now().isoformat(timespec="seconds"))
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written to {out}")
    failed = [r for r in rows if r.get("errors") or r.get("server_errors") or r.get("unexpected")
              or r.get("health", {}).get("failures") or r.get("health", {}).get("max_ms", 0) > 100]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
