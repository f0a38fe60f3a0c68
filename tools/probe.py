"""Robustness probe for bitdance-rt and bitdance-export: hostile inputs, damaged files, signals,
full disks and directories holding the user's files, drawn at random from one seed.

    python tools/probe.py [--seed N] [--quick] [--family NAME ...] [--keep] [-v]

Families (default: all but ``exports``, which first makes an export, about 70 s):

  cli        bad values for every option of every command (in process)
  files      damaged checkpoint JSON files and safetensors headers, then ``generate``
  server     hostile requests to the FastAPI app over the demo model (in process)
  signals    SIGINT / SIGTERM at random times to generate, serve and make-tiny
  disks      small, nearly full tmpfs file systems (needs root) and names near NAME_MAX
  userfiles  directories holding the user's files given as --out to the writers
  exports    a damaged export: manifest, file names, .onnx bytes (check and generate)

A case is clean when: the exit status is 0 or 2 (0 or 128 + the signal for signal cases);
nothing says "Traceback" or "internal error"; an error is one final "error:" line (click's
usage message, the parser's own form, is accepted too); no file of the user's changed or
vanished; no temporary ``.partial`` / ``.staging`` / ``.old`` entry was left; a damaged input
that is accepted gives exactly the undamaged result; and it answers within its time limit.
The server must answer 4xx (or 200 to a valid request) in OpenAI's error shape, never 5xx, and
never show a server path or a traceback.

One line is printed per failing case (what failed, a command to reproduce it, the output's
last lines), then a table; the exit status is 1 if any case failed or the probe itself broke,
else 0. Default mode runs about 600 cases in about 5 minutes on 2 cores, --quick about 100 in
about 2. Work files live in a new temporary directory, kept when something failed (each
failing case's inputs and full output, ``output.txt``, are in cases/FAMILY-NNN). The same seed
gives the same cases; signal timings are fractions of a measured run, so they vary a little.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
import zlib
from pathlib import Path

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=".*httpx.*")

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ["cli", "files", "server", "signals", "disks", "userfiles", "exports"]
COUNTS = {"cli": (300, 45), "files": (40, 14), "server": (200, 30), "signals": (14, 4),
          "disks": (14, 4), "userfiles": (30, 8), "exports": (12, 4)}  # (default, --quick)
TEMP = re.compile(r"^\..*\.(partial|staging|old)$|\.partial$|^\.bitdance-write-check\.")
ENTRY = {"rt": "from bitdance_rt.entry import rt; rt()",
         "export": "from bitdance_rt.entry import export; export()"}
PROG = {"rt": "bitdance-rt", "export": "bitdance-export"}
CPU = ["--no-progress", "--device", "cpu"]
FAST = ["--height", "256", "--width", "896", "--steps", "1", *CPU]  # a tiny checkpoint, quickly
DEMO = ["-p", "a red circle", "--steps", "2", *CPU]                   # the demo model, quickly
URL = "/v1/images/generations"


class ProbeError(Exception):
    """The probe's own setup failed: reported apart, not a finding about bitdance-rt."""


# -- looking at files --------------------------------------------------------------------------

def snapshot(root: Path) -> dict:
    """Every entry under ``root``: path -> (kind, size, mtime_ns, inode)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st, kind = os.lstat(p), "l" if p.is_symlink() else "d" if p.is_dir() else "f"
            out[str(p)] = (kind, 0, 0, st.st_ino) if kind == "d" else \
                (kind, st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def changed(before: dict, after: dict, exempt=()) -> list[str]:
    """Entries of ``before`` gone or different in ``after`` (directories: gone only)."""
    bad = []
    for p, v in before.items():
        if any(p == e or p.startswith(e + "/") for e in exempt):
            continue
        if p not in after:
            bad.append(f"deleted {p}")
        elif v[0] != "d" and after[p] != v:
            bad.append(f"changed {p}")
    return bad


def hashes(d: Path) -> dict:
    """A directory's files by name and sha256 (empty when it does not exist)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())
            if p.is_file()} if d.is_dir() else {}


def leftovers(root: Path) -> list[str]:
    return [str(Path(d) / n) for d, ds, fs in os.walk(root) for n in ds + fs if TEMP.search(n)]


def png_ok(path: Path) -> bool:
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 (whatever the reason, the image is not complete)
        return False


def pixels(path: Path):
    import numpy as np
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


# -- running commands ---------------------------------------------------------------------------

@contextlib.contextmanager
def watchdog(seconds: float):
    """SIGINT to this process if the block outlasts ``seconds`` (the CLI then stops with
    "interrupted"); ``state["fired"]`` says so. A block that ignores even that ends the probe."""
    state = {"fired": False}

    def fire():
        state["fired"] = True
        os.kill(os.getpid(), signal.SIGINT)

    def give_up():
        print(f"probe: a case ignored SIGINT for 120 s after {seconds:.0f} s; stopping",
              flush=True)
        os._exit(3)

    timers = [threading.Timer(seconds, fire), threading.Timer(seconds + 120, give_up)]
    for t in timers:
        t.daemon = True
        t.start()
    try:
        yield state
    except KeyboardInterrupt:
        if not state["fired"]:
            raise
    finally:
        for t in timers:
            t.cancel()


def rgb_bytes(path: Path) -> bytes:
    """An image's pixels (its PNG metadata names paths that differ between runs)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB").tobytes()


class Result:
    """A command's exit status and output; ``hung``: the probe had to stop it."""

    def __init__(self, rc, out, err, hung=False, note=""):
        self.rc, self.out, self.err, self.hung, self.note = rc, out, err, hung, note

    def tail(self, n=3) -> str:
        lines = [l for l in (self.err or self.out).splitlines() if l.strip()]
        return " | ".join(l[:300] for l in lines[-n:])


def invoke(app: str, args: list, timeout: float = 120) -> Result:
    """One command in this process, through typer's CliRunner."""
    from typer.testing import CliRunner
    from bitdance_rt.cli import export_app, rt_app

    r = None
    with watchdog(timeout) as dog:
        r = CliRunner().invoke(rt_app if app == "rt" else export_app, [str(a) for a in args])
    if r is None:
        return Result(130, "", "", hung=True)
    note = ""
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        note = "uncaught " + traceback.format_exception_only(r.exception)[-1].strip()
    return Result(r.exit_code, r.output, r.stderr, hung=dog["fired"], note=note)


def spawn(app: str, args: list, env: dict, cwd: Path) -> subprocess.Popen:
    """The console script ``app`` as a process of its own (what a shell runs)."""
    return subprocess.Popen([sys.executable, "-c", ENTRY[app], *map(str, args)], env=env,
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace")


def finish(p: subprocess.Popen, timeout=300) -> Result:
    """Wait for ``p``; killed after ``timeout`` s (a hang)."""
    try:
        out, err = p.communicate(timeout=timeout)
        return Result(p.returncode, out + err, err)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        return Result(p.returncode, out + err, err, hung=True)


def judge(r: Result, info=None, ok=(0, 2), sig_code=None) -> list[str]:
    """The CLI policy's checks on one result (kept in ``info`` for the report)."""
    if info is not None:
        info["result"] = r
    probs = ["no answer within the time limit (stopped by the probe)"] if r.hung else []
    probs += [r.note] if r.note else []
    probs += [f"exit {r.rc}"] if r.rc not in ok else []
    text = (r.out or "") + (r.err or "")
    probs += ["traceback printed"] if "Traceback" in text else []
    probs += ["internal error"] if "internal error" in text else []
    lines = [l for l in (r.err or r.out).splitlines() if l.strip()]
    if r.rc == 2 and not r.hung:
        usage = "Usage:" in text and any(l.startswith("Error:") for l in lines)
        errs = [l for l in lines if l.startswith("error:")]
        if not usage and (len(errs) != 1 or not lines[-1].startswith("error:")):
            probs.append(f"exit 2 without exactly one final 'error:' line ({len(errs)} found)")
    if sig_code and r.rc == sig_code and not (lines and lines[-1].startswith("interrupted")):
        probs.append("interrupted without a final 'interrupted' line")
    return probs


def repro(app: str, args) -> str:
    """A shell command line, or the argv as Python writes it when a shell cannot carry it."""
    args = [str(a) for a in args]
    if all(a.isprintable() and len(a) < 300 for a in args):
        return " ".join([PROG[app]] + [shlex.quote(a) for a in args])
    short = [a if len(a) < 300 else a[:40] + f"...<{len(a)} chars>" for a in args]
    return f"{PROG[app]} with argv {short!r}"


# -- the probe ---------------------------------------------------------------------------------

class Probe:
    def __init__(self, seed: int, quick: bool, work: Path, verbose: bool):
        self.seed, self.quick, self.work, self.verbose = seed, quick, work, verbose
        self.rng = random.Random(seed)
        self.table, self.failures, self.probe_errors = {}, [], []
        self.fix, self.cases = work / "fixtures", work / "cases"  # fixtures: read, never changed
        self.cwd = self.fix / "cwd" / "a" / "b"  # relative outputs ("", ".", "..") land here
        for d in (self.fix, self.cases, self.cwd):
            d.mkdir(parents=True)
        (self.cwd / "notes.txt").write_text("the user's notes in the working directory\n")
        os.environ["XDG_CACHE_HOME"] = str(work / "cache")  # never the user's own cache
        os.chdir(self.cwd)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.fix_snap, self.tiny_ref, self.marker = None, None, None

    def count(self, family: str) -> int:
        return COUNTS[family][1 if self.quick else 0]

    def case(self, family: str, i: int, fn, *a):
        """Run ``fn(dir, info, *a)`` (its problems) in a fresh directory; print failures."""
        d = self.cases / f"{family}-{i:03d}"
        d.mkdir()
        row = self.table.setdefault(family, [0, 0, 0])
        info = {"repro": "", "inputs": "", "result": None, "said": ""}
        try:
            probs = fn(d, info, *a)
            for root in (d, self.fix, self.work / "cache"):
                probs += [f"left {p}" for p in leftovers(root)]
            if self.fix_snap is not None:
                probs += [f"{c} (a shared input)" for c in changed(self.fix_snap,
                                                                    snapshot(self.fix))]
        except Exception as e:  # noqa: BLE001 (the probe's own failure: reported apart)
            msg = str(e) if isinstance(e, ProbeError) else \
                " | ".join(traceback.format_exception(e)[-2:]).replace("\n", " ")
            self.probe_errors.append(f"{family}#{i}: {msg}")
            print(f"PROBE-ERROR {family}#{i}: {msg}", flush=True)
            return
        r = info["result"]
        said = info["said"] or (f"exit {r.rc}: {r.tail()}" if r is not None else "")
        row[0] += 1
        if self.verbose:
            print(f"  {family}#{i} {'FAIL' if probs else 'ok'} {info['repro'][:200]} "
                  f"{info['inputs'][:160]} -> {said[-200:]}", flush=True)
        if not probs:
            row[1] += 1
            shutil.rmtree(d, ignore_errors=True)
            return
        row[2] += 1
        if r is not None:  # the whole output, for whoever reads the report
            (d / "output.txt").write_text(f"{info['repro']}\n{info['inputs']}\nexit {r.rc}\n"
                                          f"--- stdout and stderr ---\n{r.out}\n"
                                          f"--- stderr ---\n{r.err}\n", errors="replace")
        line = (f"FAIL {family}#{i}: {'; '.join(dict.fromkeys(probs))} | repro: {info['repro']}"
                + (f" | inputs: {info['inputs']}" if info["inputs"] else "")
                + (f" | output: {said}" if said else ""))
        self.failures.append(line)
        print(line, flush=True)
        if self.fix_snap is not None:  # report a damaged fixture once, not in every later case
            self.fix_snap = {k: v for k, v in snapshot(self.fix).items() if k in self.fix_snap}

    # -- shared inputs ---------------------------------------------------------------------------

    def setup(self, families):
        f = self.fix
        self.ckpt = f / "ckpt"
        r = invoke("export", ["make-tiny", "--out", self.ckpt, "--parallel-num", "4", "--seed",
                              "0"], timeout=300)
        r2 = invoke("rt", ["generate", *DEMO, "--out", f / "red.png"])
        if r.rc or r2.rc:
            raise ProbeError(f"make-tiny or generate failed: {r.tail()} {r2.tail()}")
        from bitdance_rt.runtime.session import builtin_checkpoint
        self.demo = builtin_checkpoint()
        (f / "notes.txt").write_text("the user's notes\n")
        (f / "emptydir").mkdir()
        (f / "garbage.bin").write_bytes(random.Random(self.seed).randbytes(4096))
        (f / "empty.txt").write_bytes(b"")
        (f / "loop").symlink_to(f / "loop")
        png = (f / "red.png").read_bytes()
        (f / "trunc.png").write_bytes(png[:len(png) // 2])
        (f / "text.png").write_text("not an image\n")

        def chunk(kind, body):
            return struct.pack(">I", len(body)) + kind + body + struct.pack(
                ">I", zlib.crc32(kind + body))
        (f / "bomb.png").write_bytes(  # a PNG that says it is 100000 x 100000 pixels
            b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 10**5, 10**5, 8, 2,
                                                               0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
        if {"cli", "userfiles"} & set(families):
            r = invoke("export", ["make-tiny", "--family", "imagenet", "--out", f / "inet"], 300)
            pt = f / "inet/pt/BitDance_tiny_1x.pt"
            r2 = invoke("export", ["convert", pt, "--out", f / "conv"], 300)
            if r.rc or r2.rc:
                raise ProbeError(f"imagenet fixtures failed: {r.tail()} {r2.tail()}")
            (f / "trunc.pt").write_bytes(pt.read_bytes()[:pt.stat().st_size // 2])
            self.make_evil_pt(f / "evil.pt")
        self.fix_snap = snapshot(f)

    def make_evil_pt(self, path: Path):
        """A .pt whose pickle runs a command (creating a marker file) when unpickled."""
        import torch
        marker = self.marker = self.work / "code-ran-marker"

        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {shlex.quote(str(marker))}",))
        torch.save({"model": {"w": Evil()}}, path)

    # -- family: cli -------------------------------------------------------------------------

    def values(self, kind: str, d: Path) -> list:
        """Bad values for an option of ``kind``; the user's files are in the case dir ``d``."""
        f = self.fix
        common = ["", " ", "\t", "x" * 5000, "\x00", "\u202e", "\U0001F98A", "a\nb"]
        num = ["-1", "0", str(10**30), str(2**64), str(-2**63), "nan", "inf", "-inf", "-0", "1e3",
               "0x10", "1.5", "9" * 5000, "1 2"] + common
        paths = [d / "missing", d / "missing/deeper", f / "emptydir", f / "notes.txt",
                 f / "garbage.bin", f / "empty.txt", f / "loop", "/", "/proc", "/dev/null",
                 "/proc/version"] + common
        return {
            "int": num, "float": num + ["1e308", "1e309", "1e-320", "-0.0", "1,5", "0x1p3"],
            "str": common + ["-", "--", "../../etc/passwd", "cpu\x00", "\uff23\uff30\uff35", "%s%n"],
            "device": common + ["cuda", "cuda:0", "cuda:-1", "cuda:99999999999999999999", "mps",
                                "meta", "xla", "cpu:1", "CPU", "cuda:", ":0", "vulkan", "hpu"],
            "dtype": common + ["float64", "int8", "bool", "complex64", "float8_e4m3fn", "half",
                               "uint8", "torch.float32", "fp64", "qint8"],
            "backend": common + ["onnxruntime", "tensorrt", "TORCH", "torch ", "tensorflow"],
            "in": paths + [f / "red.png", f / "trunc.png", f / "bomb.png", f / "text.png"],
            "dir": paths + [f / "ckpt/config.json", f / "red.png"],
            "pt": paths + [f / "evil.pt", f / "trunc.pt", f / "ckpt/model.safetensors"],
            # outputs: never a real device or "/" (root could replace them)
            "out": [d / "missing", d / "missing/deeper", d / "userdir", d / "notes.txt",
                    d / "devnull", d / "x.jpg", d / "x", f"{d}/sub/", d / "notes.txt/x.png",
                    "/proc/x.png", "/proc", ".", "..", d / ("y" * 300), d / "a\nb.png",
                    d / "\x00.png", d / "-x.png", *common],
            # where a directory output must be refused (the cwd holds a file of the user's)
            "dirout": [d / "userdir", d / "notes.txt", d / "devnull", d / "notes.txt/x",
                       "/proc/x", "/proc", ".", "..", "", "x" * 5000, "\x00", d / ("y" * 300)],
            "shard": common + ["1/0", "5/2", "-1/2", "a/b", "0/" + str(10**30), "0/0", "1/1/1"],
            "size": common + ["0x0", "x", "1024", "-1x5", f"{10**30}x1", "256x896x3", "nanxnan"],
        }[kind]

    # command: (app, base command line, "OPTION:KIND ..."); {S} case dir, {C} checkpoint,
    # {F} fixtures; an upper-case OPTION is the positional argument (second word)
    COMMANDS = {
        "generate": ("rt", "generate -p X --steps 2 --no-progress --device cpu --out {S}/g.png",
                     "-p:str -c:dir --class:str --height:int --width:int --steps:int "
                     "--guidance:float --seed:int -n:int --device:device --dtype:dtype "
                     "--out:out --backend:backend --export-dir:dir"),
        "memory": ("rt", "memory --preset tiny", "--preset:str -r:str --height:int --width:int "
                   "-n:int --steps:int --guidance:float --prompt-tokens:int"),
        "score": ("rt", "score {F}/red.png -p X", "IMAGE:in -p:str --json:out"),
        "sample": ("rt", "sample -c {F}/conv -o {S}/s.npz --num 2 --batch 2 --steps 1 "
                   "--no-progress --device cpu",
                   "-c:dir -o:out --num:int --per-class:int --batch:int --seed:int --steps:int "
                   "--guidance:float --backend:backend --device:device --dtype:dtype "
                   "--shard:shard"),
        "export": ("export", "-c {C} --out {S}/exp",
                   "-c:dir --out:dirout -m:str --dtype:dtype --max-batch:int --max-seq:int "
                   "--num-layers:int --attention:str --target:str --opt-size:size "
                   "--opt-batch:int --trt:str"),
        "make-tiny": ("export", "make-tiny --out {S}/t", "OUT_DIR:out --out:out --family:str "
                      "--parallel-num:int --seed:int --size:str"),
        "check": ("export", "check {C}", "EXPORT_DIR:dir -c:dir --seed:int"),
        "build": ("export", "build {C}", "EXPORT_DIR:dir -o:out --target:str --opt-size:size "
                  "--opt-batch:int --trt:str --timing-cache:in"),
        "calibrate": ("export", "calibrate -c {C} -o {S}/cal.safetensors --samples 1 --steps 1 "
                      "--height 256 --width 896 --no-progress --device cpu",
                      "-c:dir -o:out --prompts:in --samples:int --steps:int --height:int "
                      "--width:int --seed:int --device:device --dtype:dtype"),
        "quantize": ("export", "quantize -c {C} -r int8-weight -o {S}/q",
                     "-c:dir -r:str -o:out --calibration:in"),
        "convert": ("export", "convert {F}/inet/pt/BitDance_tiny_1x.pt -o {S}/cv",
                    "MODEL_PT:pt -a:pt -o:out --weights:str"),
    }
    NEEDS = {("generate", "--export-dir"): ["--backend", "onnxruntime"],  # only means it with
             **{("export", o): ["--engines"] for o in ("--target", "--opt-size", "--opt-batch",
                                                       "--trt")}}
    EXEMPT = {("generate", "--out"), ("score", "--json")}  # outputs a user may name to replace

    def cli_case(self, d: Path, info, cmd: str, opt: str, value):
        app, base, _ = self.COMMANDS[cmd]
        (d / "notes.txt").write_text("the user's file\n")
        (d / "userdir").mkdir()
        (d / "userdir" / "notes.txt").write_text("the user's notes\n")
        if os.geteuid() == 0:  # a character device like /dev/null, but the probe's own
            os.mknod(d / "devnull", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        args = [{"X": "a red circle"}.get(w, w).replace("{S}", str(d))
                .replace("{C}", str(self.ckpt)).replace("{F}", str(self.fix))
                for w in base.split()]
        value = str(value)
        if opt.isupper():  # the positional argument
            args = [args[0], value] if cmd == "make-tiny" else [args[0], value, *args[2:]]
        elif opt in args:
            args[args.index(opt) + 1] = value
        else:
            args += [opt, value] + self.NEEDS.get((cmd, opt), [])
        info["repro"] = repro(app, args)
        before = snapshot(d)
        r = invoke(app, args, timeout=30 if cmd in ("export", "build") else 120)
        probs = judge(r, info)
        probs += changed(before, snapshot(d), [value] if (cmd, opt) in self.EXEMPT else [])
        if self.marker is not None and self.marker.exists():
            probs.append("code inside the .pt file ran")
            self.marker.unlink()
        return probs

    def family_cli(self):
        names = list(self.COMMANDS)
        opts = {n: dict(o.split(":") for o in self.COMMANDS[n][2].split()) for n in names}
        for i in range(self.count("cli")):
            cmd = self.rng.choices(names, [len(opts[n]) for n in names])[0]
            opt = self.rng.choice(sorted(opts[cmd]))
            value = self.rng.choice(self.values(opts[cmd][opt], self.cases / f"cli-{i:03d}"))
            self.case("cli", i, self.cli_case, cmd, opt, value)

    # -- family: files -----------------------------------------------------------------------

    def damage_json(self, raw: bytes, rng: random.Random) -> tuple[bytes, str]:
        """``raw`` JSON damaged one random way, and what was done."""
        op = rng.choice(["flip", "cut", "utf8", "nest", "whole", "type", "type", "huge", "drop",
                         "dup"])
        b, n = bytearray(raw), rng.randrange(len(raw))
        if op == "flip":
            for _ in range(rng.randint(1, 3)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            return bytes(b), "bits flipped"
        if op == "cut":
            return raw[:n], f"truncated to {n} bytes"
        if op == "utf8":
            bad = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80\x80", b"\xfe\xff"])
            return raw[:n] + bad + raw[n:], f"{bad!r} inserted at byte {n}"
        if op == "nest":
            return b"[" * 10000 + b"1" + b"]" * 10000, "10000 nested lists"
        if op == "whole":
            body = rng.choice([b"[]", b"null", b'"x"', b"1", b"", b"{}", b"\xef\xbb\xbf" + raw])
            return body, f"whole file replaced by {body[:20]!r}"
        data, paths = json.loads(raw), []

        def walk(o, path):
            for k, v in (o.items() if isinstance(o, dict) else ()):
                paths.append(path + [k])
                walk(v, path + [k])
        walk(data, [])
        path = rng.choice(paths)
        parent = data
        for k in path[:-1]:
            parent = parent[k]
        old, where = parent[path[-1]], ".".join(path)
        if op == "drop":
            del parent[path[-1]]
            return json.dumps(data).encode(), f"key {where} removed"
        if op == "dup":
            return (json.dumps(data)[:-1] + f', "{path[0]}": [1, 2]}}').encode(), \
                f"key {path[0]!r} repeated with [1, 2]"
        new = rng.choice([10**30, -10**30, 2**64, 10**400, 1e308, -1, 0] if op == "huge" else
                         [[old], str(old), None, {"v": old}, True, "", [], 1.5, [[[[[]]]]]]
                         + ([float(old)] if isinstance(old, int) else []))
        parent[path[-1]] = new
        return json.dumps(data).encode(), f"{where}: {old!r:.40} -> {new!r:.60}"

    def damage_safetensors(self, raw: bytes, rng: random.Random) -> tuple[bytes, str]:
        """A safetensors file with its header damaged (never its tensor data)."""
        n = struct.unpack("<Q", raw[:8])[0]
        op, b = rng.choice(["len", "len_value", "flip", "flip", "cut", "entry"]), bytearray(raw)
        if op == "len":
            i = rng.randrange(8)
            b[i] ^= 1 << rng.randrange(8)
            return bytes(b), f"bit flipped in the header length, byte {i}"
        if op == "len_value":
            v = rng.choice([0, 1, 2, n - 1, n + 1, len(raw), 2**63, 2**64 - 1])
            return struct.pack("<Q", v) + raw[8:], f"header length {n} -> {v}"
        if op == "flip":
            where = [8 + rng.randrange(n) for _ in range(rng.randint(1, 3))]
            for i in where:
                b[i] ^= 1 << rng.randrange(8)
            return bytes(b), f"bits flipped in the JSON header at bytes {where}"
        if op == "cut":
            cut = rng.choice([rng.randrange(8), 8 + rng.randrange(n),
                              8 + n + rng.randrange(len(raw) - 8 - n)])
            return raw[:cut], f"truncated to {cut} of {len(raw)} bytes"
        header = json.loads(raw[8:8 + n])
        name = rng.choice([k for k in header if k != "__metadata__"])
        e, field = header[name], rng.choice(["dtype", "shape", "data_offsets"])
        lo, hi = e["data_offsets"]
        new = rng.choice({"dtype": ["I32", "F16", "BF16", "F64", "U8", "X9", 5, None],
                          "shape": [e["shape"][::-1], e["shape"] + [1], [-1], [10**12], [],
                                    [s + 1 for s in e["shape"]], "12"],
                          "data_offsets": [[hi, lo], [0, 10**15], [-4, 0], [lo + 1, hi + 1],
                                           [0]]}[field])
        e[field] = new if new != e[field] else [None]
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        return struct.pack("<Q", len(h)) + h + raw[8 + n:], f"tensor {name}: {field} -> {new!r:.60}"

    def baseline(self, src: Path, args: list):
        """The pixels ``generate`` makes from the undamaged checkpoint ``src``."""
        out = self.work / "baseline" / (src.name + ".png")
        out.parent.mkdir(exist_ok=True)
        r = invoke("rt", ["generate", "-c", src, *args, "--out", out], timeout=300)
        if r.rc != 0:
            raise ProbeError(f"baseline generate failed: {r.tail()}")
        return pixels(out)

    def files_case(self, d: Path, info, src: Path, target: str, args: list, base):
        rng = random.Random(self.rng.random())
        raw = (src / target).read_bytes()
        new, what = (self.damage_json if target.endswith(".json") else
                     self.damage_safetensors)(raw, rng)
        ck, out = d / "ckpt", d / "out.png"
        ck.mkdir()
        for p in src.iterdir():  # hard links, but a fresh copy of the file to damage
            (shutil.copy2 if p.name == target else os.link)(p, ck / p.name)
        (ck / target).write_bytes(new)
        cmd = ["generate", "-c", ck, *args, "--out", out]
        info["repro"] = repro("rt", cmd)
        info["inputs"] = f"{src.name}/{target} damaged: {what} (the damaged copy is in {ck})"
        r = invoke("rt", cmd, timeout=180)
        probs = judge(r, info)
        if r.rc == 0 and not png_ok(out):
            probs.append("exit 0 without a complete image")
        elif r.rc == 0 and not (pixels(out) == base).all():
            probs.append("exit 0 with an image unlike the undamaged checkpoint's: a silent "
                         "wrong result")
        return probs

    def family_files(self):
        demo = self.fix / "demo"
        shutil.copytree(self.demo, demo)  # the demo model has a bitdance_rt.json
        self.fix_snap = snapshot(self.fix)
        tiny, demo_args = ["-p", "x", *FAST], DEMO
        bases = {"ckpt": self.baseline(self.ckpt, tiny), "demo": self.baseline(demo, demo_args)}
        jsons = ["config.json", "vision_head_config.json", "ae_config.json",
                 "tokenizer_config.json"]
        tensors = ["model.safetensors", "vision_head.safetensors", "ae.safetensors",
                   "projector.safetensors"]
        for i in range(self.count("files")):
            if self.rng.random() < 0.8:
                src, args, target = self.ckpt, tiny, self.rng.choice(jsons * 2 + tensors)
            else:
                src, args = demo, demo_args
                target = self.rng.choice(["bitdance_rt.json", "config.json", "model.safetensors"])
            self.case("files", i, self.files_case, src, target, args, bases[src.name])

    # -- family: exports (only when asked for) -----------------------------------------------

    def exports_case(self, d: Path, info, exp: Path):
        rng, e = random.Random(self.rng.random()), d / "exp"
        shutil.copytree(exp, e)
        m, op = e / "manifest.json", rng.choice(["json", "json", "name", "onnx"])
        if op == "json":
            new, what = self.damage_json(m.read_bytes(), rng)
            m.write_bytes(new)
        elif op == "name":
            data = json.loads(m.read_bytes())
            g, h = rng.sample(sorted(data["graphs"]), 2)
            bad = rng.choice(["../x", "/etc/passwd", "../../ckpt/config.json", "a/../../b", "",
                              "decoder.onnx/.."])
            entry, how = data["graphs"][g], rng.choice(["file", "keys", "swap"])
            if how == "file":
                entry["file"], what = bad, f"graphs.{g}.file -> {bad!r}"
            elif how == "keys":  # the new name everywhere: file, its size and its hash
                old = entry["file"]
                entry["file"] = bad
                entry["files"] = {bad: entry["files"].pop(old), **entry["files"]}
                entry["sha256"] = {bad: entry["sha256"].pop(old), **entry["sha256"]}
                what = f"graphs.{g}: {old!r} renamed {bad!r} in file, files and sha256"
            else:  # a coherent record, of another graph's file
                for k in ("file", "files", "sha256"):
                    entry[k] = data["graphs"][h][k]
                what = f"graphs.{g} names {h}'s file (with its size and hash)"
            m.write_text(json.dumps(data, indent=2))
        else:
            f = rng.choice(sorted(e.glob("*.onnx")))
            b, i = bytearray(f.read_bytes()), rng.randrange(f.stat().st_size)
            b[i] ^= 1 << rng.randrange(8)
            f.write_bytes(bytes(b))
            what = f"a bit flipped in {f.name} at byte {i}"
        info["inputs"] = f"{what} (the damaged copy is in {e})"
        app, cmd = rng.choice([("export", ["check", e, "-c", self.ckpt, "--seed", "0"]),
                               ("rt", ["generate", "--backend", "onnxruntime", "--export-dir", e,
                                       "-c", self.ckpt, "-p", "x", *FAST, "--out", d / "o.png"])])
        info["repro"] = repro(app, cmd)
        r = invoke(app, cmd, timeout=300)  # check's exit 1: graphs off PyTorch, also a refusal
        kind = {"json": "a damaged manifest.json", "name": "a manifest naming another file",
                "onnx": "a changed .onnx file"}[op]
        wrong = r.rc == 0
        if wrong and op == "json":  # accepted: fine only if the damage changed nothing
            same = self.undamaged_result(app, exp, d)
            got = rgb_bytes(d / "o.png") if app == "rt" else r.out.replace(str(e), "EXP")
            wrong = got != same
        return judge(r, info, ok=(0, 1, 2) if app == "export" else (0, 2)) + \
            ([f"exit 0 with {kind} and another result"] if wrong else [])

    def undamaged_result(self, app: str, exp: Path, d: Path):
        """What the same command gives with the undamaged export (computed once per app)."""
        cache = self.__dict__.setdefault("_undamaged", {})
        if app not in cache:
            out = d.parent / f"undamaged-{app}"
            out.mkdir(exist_ok=True)
            if app == "rt":
                invoke("rt", ["generate", "--backend", "onnxruntime", "--export-dir", exp,
                              "-c", self.ckpt, "-p", "x", *FAST, "--out", out / "o.png"],
                       timeout=300)
                cache[app] = rgb_bytes(out / "o.png")
            else:
                r = invoke("export", ["check", exp, "-c", self.ckpt, "--seed", "0"], timeout=300)
                cache[app] = r.out.replace(str(exp), "EXP")
        return cache[app]

    def family_exports(self):
        exp = self.fix / "export"
        r = invoke("export", ["--checkpoint", self.ckpt, "--out", exp], timeout=900)
        if r.rc != 0:
            raise ProbeError(f"export failed: {r.tail()}")
        # what the undamaged export gives, before the snapshot: the first run of a command on
        # an export records its verified hashes there (.bitdance-verified.json), by design
        ref = self.cases / "exports-reference"
        ref.mkdir()
        for app in ("rt", "export"):
            self.undamaged_result(app, exp, ref / "x")
        self.fix_snap = snapshot(self.fix)
        for i in range(self.count("exports")):
            self.case("exports", i, self.exports_case, exp)

    # -- family: server ----------------------------------------------------------------------

    def hostile(self, rng: random.Random):
        """(method, path, body, headers, images expected, with the API key server?)"""
        pick = rng.random()
        if pick < 0.08:  # the server with --api-key s3cret: odd Authorization headers
            auth = rng.choice(["Bearer", "Bearer ", "Bearer s3cret ", "bearer s3cret",
                               "Basic !!!", "Basic " + base64.b64encode(b"x:s3cret").decode(),
                               "Basic " + base64.b64encode(b"s3cret").decode(), "Digest s3cret",
                               b"Bearer \xff\xfe", "Bearer " + "x" * 10000, "Basic =", ""])
            method, path = rng.choice([("GET", "/v1/models"), ("GET", "/"), ("GET", "/metrics"),
                                       ("GET", "/healthz"), ("POST", URL)])
            body = b'{"prompt": "a red circle", "steps": 2}' if method == "POST" else None
            return method, path, body, {"authorization": auth}, 1, True
        if pick < 0.1:  # a chunked body (no length) over the size limit
            return "POST", URL, iter([b'{"prompt": "'] + [b"x" * 65536] * 40 + [b'"}']), {}, \
                None, False
        if pick < 0.12:  # other routes and methods
            path = rng.choice(["/nope", "/v1/images", URL + "/x", "/%00", "/v1/../etc/passwd",
                               "/" + "a" * 10000, "/\u202e", "/metrics/x", "/v1/models/x", "//",
                               "/healthz?x=" + "y" * 5000, URL])
            return rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH"]), path, None, {}, None, \
                False
        if pick < 0.35:  # a whole body
            body = rng.choice([
                b"", b"null", b"[]", b'"x"', b"123", b"{", b"{not json", b"\xff\xfe{}",
                b"[" * 10000 + b"]" * 10000, b'{"prompt": ' * 5000 + b'"x"' + b"}" * 5000,
                '{"prompt": "a red circle"}'.encode("utf-16"), b'\xef\xbb\xbf{"prompt": "x"}',
                b'{"prompt": "x"} trailing', b'{"prompt": "x", "prompt": 5}',
                b'{"prompt": "x", "n": 1' + b"0" * 5000 + b"}", b'{"prompt": "\\ud800"}',
                b'{"prompt": "x", "seed": -Infinity}', b'{"prompt": "x", "steps": 1e999}',
                b'{"prompt": "' + b"x" * (2 << 20) + b'"}', b"\x00" * 100,
                b'{"' + b"k" * 100000 + b'": 1}', b'{"prompt": "x", "size": NaN}'])
            headers = rng.choice([{}, {"content-type": "text/plain"}, {"content-encoding": "gzip"},
                                  {"content-type": "application/x-www-form-urlencoded"}])
            return "POST", URL, body, headers, None, False
        body = {"prompt": "a red circle", "size": "128x128", "steps": 2}  # valid: then spoiled
        fields = ["prompt", "n", "size", "response_format", "output_format", "model", "seed",
                  "steps", "guidance", "negative_prompt", "stream", "user", "seeds", "",
                  "x" * 1000, "__proto__"]
        vals = [-1, 0, 1, 4, 5, 10**30, 2**64, -2**63, 1e308, -0.0, 1.5, True, False, None, "",
                " ", "x" * 5000, "word " * 9000, "\u202e", "\U0001F98A", "\x00", [], [1], {},
                {"a": 1}, [[[[[[1]]]]]], "2", "128x128", "0x0", "1x1", "999999x999999",
                "128X128", " 128x128 ", "-128x128", "\uff11\uff12\uff18x128", "auto", "b64_json",
                "url", "PNG", "jpeg", "bitdance-demo-shapes", "NaN!", "Infinity!", "1e999!"]
        for _ in range(rng.randint(1, 2)):
            f = rng.choice(fields)
            if rng.random() < 0.1:
                body.pop(f, None)
            else:
                body[f] = rng.choice(vals)
        text = json.dumps(body)
        for token in ("NaN", "Infinity", "1e999"):  # bare tokens that JSON does not allow
            text = text.replace(f'"{token}!"', token)
        return "POST", URL, text.encode(), {"content-type": "application/json"}, \
            body.get("n", 1), False

    def server_case(self, d: Path, info, clients, req):
        method, path, body, headers, n, keyed = req
        shown = "<chunked: 2.5 MiB>" if not isinstance(body, (bytes, type(None))) else \
            body if body is None or len(body) < 200 else body[:80] + b"...(%d bytes)" % len(body)
        info["repro"] = (f"{method} {path[:120]!r} body={shown!r} headers={str(headers)[:120]} "
                         f"to create_app over the demo model (max_batch 4"
                         f"{', api_key s3cret' if keyed else ''})")
        with watchdog(120) as dog:
            r = clients[keyed].request(method, path, content=body, headers=headers)
        if dog["fired"]:
            return ["no answer within 120 s"]
        text, code = r.text, r.status_code
        info["said"] = f"status {code}: {text[-300:]!r}"
        probs = [f"status {code}"] if code >= 500 else []
        probs += [f"the answer holds {leak!r}" for leak in ("Traceback", 'File "', str(REPO),
                                                            str(self.work), "site-packages")
                  if leak in text]
        if code >= 400:
            try:
                if "\n" in r.json()["error"]["message"]:
                    probs.append("the error message is not one line")
            except Exception:  # noqa: BLE001
                probs.append("the error answer is not OpenAI's JSON error shape")
        elif code == 200 and path == URL and method == "POST":
            if r.headers.get("content-type", "").startswith("text/event-stream"):
                probs += ["the stream ended in a 5xx error event" for ev in text.split("\n\n")
                          if ev.startswith("event: error") and '"code": 5' in ev]
            else:
                data = r.json().get("data", [])
                if isinstance(n, int) and len(data) != n:
                    probs.append(f"{len(data)} images for n={n}")
                for item in data:
                    (d / "img.png").write_bytes(base64.b64decode(item["b64_json"]))
                    probs += [] if png_ok(d / "img.png") else ["an image is not a complete PNG"]
        return probs

    def family_server(self):
        from fastapi.testclient import TestClient
        from bitdance_rt.runtime.session import Session
        from bitdance_rt.serve.app import create_app
        from bitdance_rt.serve.config import ServeConfig
        from bitdance_rt.serve.service import ImageService

        session = Session.open(self.demo, device="cpu")

        def client(**kw):
            config = ServeConfig(max_batch=4, warmup=False, timeout=120, **kw)
            return TestClient(create_app(ImageService(config, session), load="startup"),
                              raise_server_exceptions=False)
        with client() as plain, client(api_key="s3cret") as keyed:
            for i in range(self.count("server")):
                self.case("server", i, self.server_case, (plain, keyed), self.hostile(self.rng))

    # -- family: signals ---------------------------------------------------------------------

    def signal_case(self, d: Path, info, what: str, sig: int, delay: float):
        if what == "serve":
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        app, args = {"generate": ("rt", ["generate", "-p", "a red circle", "-n", "2", "--out",
                                         d / "x.png", *CPU]),
                     "serve": ("rt", ["serve", "--port", port if what == "serve" else 0,
                                      "--device", "cpu"]),
                     "make-tiny": ("export", ["make-tiny", "--out", d / "t"])}[what]
        info["repro"] = repro(app, args) + \
            f"  (in {d}; {signal.Signals(sig).name} after {delay:.2f} s)"
        p = spawn(app, args, self.env, d)
        time.sleep(delay)
        p.send_signal(sig)
        r, code = finish(p, timeout=180), 128 + sig
        # serve logs as it stops: its last line need not be "interrupted"
        probs = judge(r, info, ok=(0, code), sig_code=None if what == "serve" else code)
        probs += ["'terminate called' (a C++ abort)"] if "terminate called" in r.out else []
        if what == "generate":
            imgs = sorted(d.glob("x*.png"))
            if r.rc == 0 and not (len(imgs) == 2 and all(map(png_ok, imgs))):
                probs.append(f"exit 0 but images {[p.name for p in imgs]} are not both complete")
            if r.rc == code and imgs:
                probs.append(f"interrupted but left images {[p.name for p in imgs]}")
        elif what == "make-tiny":
            if r.rc == 0 and hashes(d / "t") != self.tiny_hashes():
                probs.append("exit 0 but the directory is not a complete make-tiny output")
            if r.rc == code and (d / "t").exists():
                probs.append("interrupted but left the output directory")
        return probs

    def tiny_hashes(self) -> dict:
        """What a complete ``make-tiny --out DIR`` writes."""
        if self.tiny_ref is None:
            ref = self.work / "tiny-ref"
            r = finish(spawn("export", ["make-tiny", "--out", ref], self.env, self.work))
            if r.rc:
                raise ProbeError(f"make-tiny failed: {r.tail()}")
            self.tiny_ref = hashes(ref)
        return self.tiny_ref

    def family_signals(self):
        ref = self.work / "signal-ref"
        ref.mkdir()
        t0 = time.monotonic()
        r = finish(spawn("rt", ["generate", "-p", "a red circle", "-n", "2", "--out",
                                ref / "x.png", *CPU], self.env, ref))
        t_gen, t1 = time.monotonic() - t0, time.monotonic()
        self.tiny_hashes()
        t_tiny = time.monotonic() - t1
        if r.rc:
            raise ProbeError(f"uninterrupted generate failed: {r.tail()}")
        print(f"signals: uninterrupted, generate -n 2 takes {t_gen:.1f} s, make-tiny "
              f"{t_tiny:.1f} s", flush=True)
        n = self.count("signals")
        plan = ["generate"] * (n - n // 4 - n // 3) + ["serve"] * (n // 4) + ["make-tiny"] * (n // 3)
        for i, what in enumerate(plan):  # the seed fixes the fraction of the run
            sig = self.rng.choice([signal.SIGINT, signal.SIGTERM])
            limit = {"generate": t_gen, "serve": 5.0, "make-tiny": t_tiny}[what]
            self.case("signals", i, self.signal_case, what, sig, self.rng.random() * limit)

    # -- family: disks -----------------------------------------------------------------------

    def disk_case(self, d: Path, info, what: str, size_mb: int, fill: float, inodes):
        opts = f"size={size_mb}m" + (f",nr_inodes={inodes}" if inodes else "")
        m = d / "mnt"
        m.mkdir()
        mount = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "none", str(m)],
                               capture_output=True, text=True)
        if mount.returncode:
            raise ProbeError(f"mount -t tmpfs failed: {mount.stderr.strip()}")
        try:
            if inodes:  # use up every inode, then free 0 to 2 of them
                for k in range(inodes):
                    with contextlib.suppress(OSError):
                        (m / f"f{k}").write_bytes(b"")
                for k in range(self.rng.randint(0, 2)):
                    with contextlib.suppress(OSError):
                        (m / f"f{k}").unlink()
            else:
                with contextlib.suppress(OSError):
                    (m / "fill").write_bytes(b"\0" * int(fill * size_mb * 2**20))
            before, k = snapshot(m), self.rng.randint(1, 4)
            app, args = ("rt", ["generate", "-p", "a red circle", "-n", k, "--steps", "2",
                                "--out", m / "x.png", *CPU]) if what == "generate" else \
                ("export", ["make-tiny", "--out", m / "t"])
            info["repro"] = repro(app, args) + f"  (on a tmpfs -o {opts}, {fill:.0%} filled)"
            r = finish(spawn(app, args, self.env, d))
            probs = judge(r, info) + changed(before, snapshot(m))
            new = sorted(set(snapshot(m)) - set(before))
            probs += [f"left {p}" for p in leftovers(m)]  # before the unmount hides them
            if r.rc == 2 and not re.search(r"space|room|inode", r.tail(1), re.I):
                probs.append("the error does not say that the disk is full")
            if r.rc == 2 and new:
                probs.append(f"refused but left {new}")
            want = [str(m / "x.png")] if k == 1 else [str(m / f"x_{j}.png") for j in range(k)]
            if r.rc == 0 and what == "generate":
                if not all(Path(p).exists() and png_ok(Path(p)) for p in want):
                    probs.append("exit 0 but not every image is complete")
                probs += [f"also left {[p for p in new if p not in want]}"] if \
                    set(new) - set(want) else []
            if r.rc == 0 and what == "make-tiny" and hashes(m / "t") != self.tiny_hashes():
                probs.append("exit 0 but the checkpoint is not complete")
            return probs
        finally:
            subprocess.run(["umount", "-l", str(m)], capture_output=True)

    def name_case(self, d: Path, info, length: int, multibyte: bool, what: str):
        """An --out name near NAME_MAX (multibyte: as many 2-byte characters)."""
        ch = "\u00e9" if multibyte else "a"
        out = d / (ch * (length - 4) + ".png" if what == "generate" else ch * length)
        app, args = ("rt", ["generate", "-n", self.rng.randint(1, 3), *DEMO, "--out", out]) \
            if what == "generate" else ("export", ["make-tiny", "--out", out])
        info["repro"] = repro(app, args)
        info["inputs"] = (f"an --out name of {len(out.name)} characters, "
                          f"{len(out.name.encode())} bytes (NAME_MAX {os.pathconf(d, 'PC_NAME_MAX')})")
        return judge(invoke(app, args), info)

    def family_disks(self):
        if os.geteuid() != 0:
            print("disks: not root, so no tmpfs cases: only names near NAME_MAX", flush=True)
        limit = os.pathconf(self.cases, "PC_NAME_MAX")
        for i in range(self.count("disks")):
            if os.geteuid() == 0 and i % 2 == 0:
                kind = self.rng.choice(["generate", "generate", "make-tiny", "inodes"])
                args = {"make-tiny": ("make-tiny", self.rng.choice([2, 16, 24]),
                                      self.rng.random(), None),
                        "inodes": ("generate", 2, 0.0, self.rng.randint(3, 8)),
                        "generate": ("generate", 2, self.rng.random(), None)}[kind]
                self.case("disks", i, self.disk_case, *args)
            else:
                self.case("disks", i, self.name_case, self.rng.randint(limit - 30, limit + 3),
                          self.rng.random() < 0.3, self.rng.choice(["generate"] * 3 + ["make-tiny"]))

    # -- family: userfiles -------------------------------------------------------------------

    def userfiles_case(self, d: Path, info, cmd: str, scene: str):
        """``cmd`` writing to a directory (or file) where the user keeps files (``scene``)."""
        u, ck, f = d / "user", str(self.ckpt), self.fix
        model = f / "inet/pt/BitDance_tiny_1x.pt"
        earlier = {"make-tiny": ["make-tiny", "--out", u], "convert": ["convert", model, "-o", u],
                   "quantize": ["quantize", "-c", ck, "-r", "int8-weight", "-o", u]}
        if scene == "earlier":  # a complete earlier output of the same command
            r = invoke("export", earlier[cmd], timeout=300)
            if r.rc:
                raise ProbeError(f"could not make the earlier output: {r.tail()}")
        if scene == "inet-dir":  # the command's own input lives in the output directory
            shutil.copytree(f / "inet", u)
            model = u / "pt/BitDance_tiny_1x.pt"
        u.mkdir(exist_ok=True)
        if scene == "hidden-only":
            (u / ".keep").write_text("")
        else:
            (u / "notes.txt").write_text("the user's notes\n")
            (u / "sub").mkdir()
            (u / "sub" / "data.csv").write_text("1,2,3\n")
        if scene == "clash":  # a file of the user's, named like an output
            (u / "config.json").write_text('{"mine": true}\n')
        target = {"file": u / "notes.txt", "under-file": u / "notes.txt" / "x",
                  "symlink": d / "link"}.get(scene, u)
        if scene == "symlink":
            target.symlink_to(u, target_is_directory=True)
        args = {"make-tiny": ["make-tiny", "--out", target],
                "quantize": ["quantize", "-c", ck, "-r", "int8-weight", "-o", target],
                "convert": ["convert", model, "-o", target],
                "calibrate": ["calibrate", "-c", ck, "-o", target, "--samples", "1", "--steps",
                              "1", "--height", "256", "--width", "896", "--no-progress"],
                "export": ["-c", ck, "--out", target]}[cmd]
        info["repro"] = repro("export", args)
        info["inputs"] = f"scene {scene}: the user's files in {u}"
        mine = {p: v for p, v in snapshot(u).items()
                if re.search(r"/(notes\.txt|sub|\.keep|pt)(/|$)", p[len(str(u)):])
                or (scene == "clash" and p.endswith("/config.json"))}
        r = invoke("export", args, timeout=60 if cmd == "export" else 300)
        return judge(r, info) + changed(mine, snapshot(u))

    def family_userfiles(self):
        scenes = ["dir", "earlier", "hidden-only", "clash", "file", "under-file", "symlink",
                  "inet-dir"]
        for i in range(self.count("userfiles")):
            cmd = self.rng.choice(["make-tiny", "quantize", "convert", "calibrate", "export"])
            ok = [s for s in scenes if (cmd in ("make-tiny", "quantize", "convert")
                                        or s != "earlier")
                  and (s != "inet-dir" or cmd == "convert")]
            self.case("userfiles", i, self.userfiles_case, cmd, self.rng.choice(ok))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    ap.add_argument("--quick", action="store_true", help="about 100 cases in about 2 minutes")
    ap.add_argument("--family", action="extend", nargs="+", choices=FAMILIES,
                    help="the families to run (default: all but exports)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("-v", "--verbose", action="store_true", help="a line for every case")
    a = ap.parse_args()
    families = a.family or [f for f in FAMILIES if f != "exports"]
    work = Path(tempfile.mkdtemp(prefix="bitdance-probe-"))
    print(f"probe: seed {a.seed}, {'quick' if a.quick else 'default'} mode, families "
          f"{' '.join(families)}; work directory {work}", flush=True)
    t0, probe = time.monotonic(), Probe(a.seed, a.quick, work, a.verbose)
    try:
        probe.setup(families)
        for fam in [f for f in FAMILIES if f in families]:
            t = time.monotonic()
            try:
                getattr(probe, f"family_{fam}")()
            except ProbeError as e:
                probe.probe_errors.append(f"{fam}: {e}")
                print(f"PROBE-ERROR {fam}: {e}", flush=True)
            print(f"{fam}: done in {time.monotonic() - t:.0f} s", flush=True)
    except ProbeError as e:
        probe.probe_errors.append(f"setup: {e}")
        print(f"PROBE-ERROR setup: {e}", flush=True)
    finally:
        os.chdir(REPO)
    print(f"\nseed {a.seed}, {time.monotonic() - t0:.0f} s\n\n"
          f"{'family':<10} | cases | clean | failures\n{'-' * 11}+{'-' * 7}+{'-' * 7}+{'-' * 9}")
    total = [0, 0, 0]
    for fam, row in probe.table.items():
        total = [x + y for x, y in zip(total, row)]
        print(f"{fam:<10} | {row[0]:>5} | {row[1]:>5} | {row[2]:>8}")
    print(f"{'total':<10} | {total[0]:>5} | {total[1]:>5} | {total[2]:>8}")
    if probe.probe_errors:
        print(f"\n{len(probe.probe_errors)} probe error(s), the probe's own, not findings:")
        print("\n".join(f"  {e}" for e in probe.probe_errors))
    bad = bool(probe.failures or probe.probe_errors)
    if bad or a.keep:
        print(f"\nwork directory kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
