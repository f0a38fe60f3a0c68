"""Robustness probe for bitdance-rt and bitdance-export: hostile inputs, damaged files, signals,
full disks and directories holding the user's files, generated at random from one seed.

    python tools/probe.py [--seed N] [--quick] [--family NAME ...] [--keep]

Families (default: all but ``exports``, which first makes an export, about 70 s):

  cli        bad values for every option of every command (in process)
  files      damaged checkpoint JSON files and safetensors headers, then ``generate``
  server     hostile request bodies and routes against the FastAPI app (in process)
  signals    SIGINT / SIGTERM at random times to generate, serve and make-tiny
  disks      small, nearly full tmpfs file systems (root only) and names near NAME_MAX
  userfiles  directories holding the user's files given as --out to the writers
  exports    a damaged export: manifest, file names, .onnx bytes (check and generate)

A case is clean when the exit status is 0 or 2 (128 + signal for signal cases), nothing says
"Traceback" or "internal error", an error is one "error:" line (click's usage message is the
parser's own form and is accepted), no file of the user's changed or vanished, no temporary
``.partial`` / ``.staging`` / ``.old`` entry was left behind, a damaged input that was accepted
gives exactly the undamaged result, and every case answers within its time limit. One line is
printed per failing case (with a command to reproduce it), then a table; the exit status is 1
if any case failed (or the probe itself broke), else 0. Work files live in a temporary
directory, kept (and named) when something failed; the same seed gives the same cases.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ["cli", "files", "server", "signals", "disks", "userfiles", "exports"]
DEFAULT = [f for f in FAMILIES if f != "exports"]
# cases per family: (default, --quick)
COUNTS = {"cli": (240, 45), "files": (70, 14), "server": (150, 30), "signals": (10, 4),
          "disks": (14, 4), "userfiles": (24, 8), "exports": (12, 4)}
TEMP = re.compile(r"(^\..*\.(partial|staging|old)$)|(\.partial$)|(^\.bitdance-write-check\.)")
RT = "from bitdance_rt.entry import rt; rt()"
EXPORT = "from bitdance_rt.entry import export; export()"
GEN_FAST = ["--height", "256", "--width", "896", "--steps", "1", "--no-progress", "--device", "cpu"]


class ProbeError(Exception):
    """The probe's own setup failed: not a finding about bitdance-rt."""


# -- looking at files ------------------------------------------------------------------------

def snapshot(root: Path) -> dict:
    """Every entry under ``root``: path -> (kind, size, mtime_ns, inode)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = os.lstat(p)
            kind = "l" if p.is_symlink() else ("d" if p.is_dir() else "f")
            out[str(p)] = (kind, 0 if kind == "d" else st.st_size,
                           0 if kind == "d" else st.st_mtime_ns, st.st_ino)
    return out


def changed(before: dict, after: dict, exempt=()) -> list[str]:
    """Entries of ``before`` that are gone or different in ``after`` (directories: gone only)."""
    bad = []
    for p, v in before.items():
        if any(p == e or p.startswith(e + "/") for e in exempt):
            continue
        if p not in after:
            bad.append(f"deleted {p}")
        elif v[0] != "d" and after[p] != v:
            bad.append(f"changed {p}")
    return bad


def leftovers(root: Path) -> list[str]:
    return [str(Path(d) / n) for d, ds, fs in os.walk(root) for n in ds + fs if TEMP.search(n)]


def png_ok(path: Path) -> bool:
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 (any failure means the image is not complete)
        return False


def pixels(path: Path):
    import numpy as np
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


# -- running the commands --------------------------------------------------------------------

@contextlib.contextmanager
def watchdog(seconds: float):
    """Interrupt the main thread (SIGINT) if the block takes longer than ``seconds``; the
    state says whether it fired. A block that ignores even that stops the probe."""
    state = {"fired": False}

    def fire():
        state["fired"] = True
        os.kill(os.getpid(), signal.SIGINT)

    def give_up():
        print(f"probe: a case ignored SIGINT for {seconds + 120:.0f} s; stopping", flush=True)
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


class Result:
    def __init__(self, rc, out, err, hung=False, note=""):
        self.rc, self.out, self.err, self.hung, self.note = rc, out, err, hung, note

    def tail(self, n=3) -> str:
        lines = [l for l in (self.err or self.out).splitlines() if l.strip()]
        return " | ".join(l[:300] for l in lines[-n:])


def invoke(app_name: str, args: list[str], timeout: float = 90) -> Result:
    """One command in this process, through typer's CliRunner."""
    from typer.testing import CliRunner
    from bitdance_rt.cli import export_app, rt_app

    app = rt_app if app_name == "rt" else export_app
    r, hung = None, False
    with watchdog(timeout) as dog:
        r = CliRunner().invoke(app, [str(a) for a in args])
    hung = dog["fired"]
    if r is None:
        return Result(130, "", "", hung=True)
    note = ""
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        note = "uncaught " + "".join(traceback.format_exception_only(type(r.exception),
                                                                      r.exception)).strip()
    return Result(r.exit_code, r.output, r.stderr, hung=hung, note=note)


def spawn(app_name: str, args: list[str], env: dict, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RT if app_name == "rt" else EXPORT,
                             *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, errors="replace", env=env, cwd=cwd)


def run_sub(app_name, args, env, cwd, timeout=300) -> Result:
    p = spawn(app_name, args, env, cwd)
    try:
        out, err = p.communicate(timeout=timeout)
        return Result(p.returncode, out + err, err)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        return Result(p.returncode, out + err, err, hung=True)


def judge(r: Result, ok_codes=(0, 2), signal_code=None) -> list[str]:
    """The CLI policy's checks on one result."""
    probs = []
    if r.hung:
        probs.append("no answer within the time limit (interrupted by the probe)")
    if r.note:
        probs.append(r.note)
    if r.rc not in ok_codes:
        probs.append(f"exit {r.rc}")
    text = (r.out or "") + (r.err or "")
    if "Traceback" in text:
        probs.append("traceback printed")
    if "internal error" in text:
        probs.append("internal error")
    lines = [l for l in (r.err or r.out).splitlines() if l.strip()]
    if r.rc == 2 and not r.hung:
        usage = any(l.startswith("Error:") for l in lines) and "Usage:" in (r.err or r.out)
        errs = [l for l in lines if l.startswith("error:")]
        if not usage and (len(errs) != 1 or not lines[-1].startswith("error:")):
            probs.append(f"exit 2 without exactly one final 'error:' line ({len(errs)} found)")
    if signal_code and r.rc == signal_code and not (lines and lines[-1].startswith("interrupted")):
        probs.append("interrupted without a last 'interrupted' line")
    return probs


def repro(prog: str, args) -> str:
    args = [str(a) for a in args]
    if all(a.isprintable() and len(a) < 300 for a in args):
        return " ".join([prog] + [shlex.quote(a) for a in args])
    return f"{prog} with argv {[a if len(a) < 300 else a[:40] + f'...<{len(a)} chars>' for a in args]!r}"


# -- the probe -------------------------------------------------------------------------------

class Probe:
    def __init__(self, seed: int, quick: bool, work: Path):
        self.seed, self.quick, self.work = seed, quick, work
        self.rng = random.Random(seed)
        self.table = {}                  # family -> [cases, clean, failures]
        self.failures, self.probe_errors = [], []
        self.fix = work / "fixtures"     # inputs every case may read but none may change
        self.cases = work / "cases"
        self.cwd = work / "cwd" / "a" / "b"  # stray relative outputs land here, not in the repo
        for d in (self.fix, self.cases, self.cwd):
            d.mkdir(parents=True)
        os.environ["XDG_CACHE_HOME"] = str(work / "cache")  # never the user's cache
        os.chdir(self.cwd)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.fixtures_snap = None

    def count(self, family: str) -> int:
        return COUNTS[family][1 if self.quick else 0]

    # a case: a fresh directory, a description, the check; failures are printed at once
    def case(self, family: str, i: int, fn, *a):
        d = self.cases / f"{family}-{i:03d}"
        d.mkdir()
        row = self.table.setdefault(family, [0, 0, 0])
        row[0] += 1
        info = {"repro": "", "inputs": "", "result": None}
        try:
            probs = fn(d, info, *a)
            for root in (d, self.fix, self.work / "cwd", self.work / "cache"):
                probs += [f"left {p}" for p in leftovers(root)]
            if self.fixtures_snap is not None:
                probs += [f"{c} (a shared input)" for c in
                          changed(self.fixtures_snap, snapshot(self.fix))]
        except ProbeError as e:
            row[0] -= 1
            self.probe_errors.append(f"{family}#{i}: {e}")
            print(f"PROBE-ERROR {family}#{i}: {e}", flush=True)
            return
        except Exception as e:  # noqa: BLE001 (the probe's own bug: reported apart)
            row[0] -= 1
            msg = "".join(traceback.format_exception(e)).strip().splitlines()
            self.probe_errors.append(f"{family}#{i}: {msg[-1]}")
            print(f"PROBE-ERROR {family}#{i}: {' | '.join(msg[-3:])}", flush=True)
            return
        if not probs:
            row[1] += 1
            shutil.rmtree(d, ignore_errors=True)
            return
        row[2] += 1
        r = info["result"]
        said = info.get("said") or (f"exit {r.rc}: {r.tail()}" if r is not None else "")
        line = (f"FAIL {family}#{i}: {'; '.join(dict.fromkeys(probs))} | repro: {info['repro']}"
                + (f" | inputs: {info['inputs']}" if info["inputs"] else "")
                + (f" | output: {said}" if said else ""))
        self.failures.append(line)
        print(line, flush=True)
        if self.fixtures_snap is not None:  # a damaged shared input would spoil later cases
            self.fixtures_snap = snapshot(self.fix)

    # -- shared inputs ---------------------------------------------------------------------

    def setup(self, families):
        f = self.fix
        r = invoke("export", ["make-tiny", "--out", f / "ckpt", "--parallel-num", "4",
                              "--seed", "0"], timeout=300)
        if r.rc != 0:
            raise ProbeError(f"make-tiny failed: {r.tail()}")
        self.ckpt = f / "ckpt"
        from bitdance_rt.runtime.session import builtin_checkpoint
        self.demo = builtin_checkpoint()
        (f / "notes.txt").write_text("the user's notes\n")
        (f / "emptydir").mkdir()
        (f / "garbage.bin").write_bytes(random.Random(self.seed).randbytes(4096))
        (f / "empty.txt").write_bytes(b"")
        (f / "loop").symlink_to(f / "loop")
        r = invoke("rt", ["generate", "-p", "a red circle", "--steps", "2", "--no-progress",
                          "--device", "cpu", "--out", f / "red.png"])
        if r.rc != 0:
            raise ProbeError(f"demo generate failed: {r.tail()}")
        png = (f / "red.png").read_bytes()
        (f / "trunc.png").write_bytes(png[:len(png) // 2])
        (f / "text.png").write_text("not an image\n")
        ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
        chunk = lambda t, b: struct.pack(">I", len(b)) + t + b + struct.pack(  # noqa: E731
            ">I", __import__("zlib").crc32(t + b))
        (f / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                                     + chunk(b"IDAT", b"x\x9c\x03\x00\x00\x00\x00\x01")
                                     + chunk(b"IEND", b""))
        if {"cli", "userfiles"} & set(families):
            r = invoke("export", ["make-tiny", "--family", "imagenet", "--out", f / "inet"], 300)
            r2 = invoke("export", ["convert", f / "inet/pt/BitDance_tiny_1x.pt", "--out",
                                   f / "conv"], 300)
            if r.rc or r2.rc:
                raise ProbeError(f"imagenet fixtures failed: {r.tail()} {r2.tail()}")
            self.make_evil_pt(f / "evil.pt")
        self.fixtures_snap = snapshot(f)

    def make_evil_pt(self, path: Path):
        """A .pt whose pickle would run a command that creates a marker file."""
        import torch
        marker = self.work / "code-ran-marker"

        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {shlex.quote(str(marker))}",))
        torch.save({"model": {"w": Evil()}}, path)
        self.marker = marker

    # -- family: cli -----------------------------------------------------------------------

    def values(self, kind: str, d: Path) -> list:
        """Bad values for an option of ``kind``; paths point into the case directory ``d``."""
        f = self.fix
        common = ["", " ", "\t", "x" * 5000, "\x00", "\u202e", "\U0001F98A", "a\nb"]
        num = ["-1", "0", str(10**30), str(2**64), "nan", "inf", "-inf", "-0", "1e3", "0x10",
               "1.5", "9" * 5000, "\u0663", "1_0", str(-2**63)] + common
        paths = [d / "missing", d / "missing/deeper", f / "emptydir", f / "notes.txt",
                 f / "garbage.bin", f / "empty.txt", f / "loop", "/", "/proc",
                 "/dev/null", "/proc/version", "x" * 5000, "\x00", "a\nb", ""]
        return {
            "int": num, "float": num + ["1e308", "1e309", "1e-320", "-0.0", "1,5", "0x1p3"],
            "str": common + ["-", "--", "../../etc/passwd", "cpu\x00", "ＣＰＵ", "%s%n"],
            "device": common + ["cuda", "cuda:0", "cuda:-1", "cuda:99999999999999999999", "mps",
                                "meta", "xla", "cpu:1", "CPU", "cuda:", ":0", "vulkan", "hpu"],
            "dtype": common + ["float64", "int8", "bool", "complex64", "float8_e4m3fn", "half",
                               "uint8", "torch.float32", "fp64", "qint8"],
            "backend": common + ["onnxruntime", "tensorrt", "TORCH", "torch ", "tensorflow"],
            "in": paths + [f / "red.png", f / "trunc.png", f / "bomb.png", f / "text.png"],
            "dir_in": paths + [f / "ckpt/config.json", f / "red.png"],
            "out": paths[:6] + [d / "x.jpg", d / "x", d / "sub/", d / "notes-copy.txt/x.png",
                                "/proc/x.png", "/dev/full", "/", ".", "..", d / ("y" * 300),
                                d / "a\nb.png", d / "\x00.png", d / "-x.png", ""],
            "pt": paths + [f / "evil.pt", f / "trunc.pt", f / "ckpt/model.safetensors"],
            "shard": common + ["1/0", "5/2", "-1/2", "a/b", "0/" + str(10**30), "0/0", "1/1/1"],
            "size": common + ["0x0", "x", "1024", "-1x5", f"{10**30}x1", "256x896x3", "nanxnan"],
        }[kind]

    COMMANDS = {  # app, base arguments ({S}: case dir, {C}: checkpoint ...), options
        "generate": ("rt", ["generate", "-p", "a red circle", "--steps", "2", "--no-progress",
                            "--device", "cpu", "--out", "{S}/g.png"],
                     {"-p": "str", "-c": "dir_in", "--class": "str", "--height": "int",
                      "--width": "int", "--steps": "int", "--guidance": "float", "--seed": "int",
                      "-n": "int", "--device": "device", "--dtype": "dtype", "--out": "out",
                      "--backend": "backend", "--export-dir": "dir_in"}),
        "memory": ("rt", ["memory", "--preset", "tiny"],
                   {"--preset": "str", "-r": "str", "--height": "int", "--width": "int",
                    "-n": "int", "--steps": "int", "--guidance": "float",
                    "--prompt-tokens": "int"}),
        "score": ("rt", ["score", "{F}/red.png", "-p", "a red circle"],
                  {"IMAGE": "in", "-p": "str", "--json": "out"}),
        "sample": ("rt", ["sample", "-c", "{F}/conv", "-o", "{S}/s.npz", "--num", "2",
                          "--batch", "2", "--steps", "1", "--no-progress", "--device", "cpu"],
                   {"-c": "dir_in", "-o": "out", "--num": "int", "--per-class": "int",
                    "--batch": "int", "--seed": "int", "--steps": "int", "--guidance": "float",
                    "--backend": "backend", "--device": "device", "--dtype": "dtype",
                    "--shard": "shard"}),
        "export": ("export", ["-c", "{C}", "--out", "{S}/exp"],
                   {"-c": "dir_in", "--out": "out", "-m": "str", "--dtype": "dtype",
                    "--max-batch": "int", "--max-seq": "int", "--num-layers": "int",
                    "--attention": "str", "--target": "str", "--opt-size": "size",
                    "--opt-batch": "int", "--trt": "str", "--timing-cache": "in"}),
        "make-tiny": ("export", ["make-tiny", "--out", "{S}/t"],
                      {"OUT_DIR": "out", "--out": "out", "--family": "str",
                       "--parallel-num": "int", "--seed": "int", "--size": "str"}),
        "check": ("export", ["check", "{C}"], {"EXPORT_DIR": "dir_in", "-c": "dir_in",
                                                "--seed": "int"}),
        "build": ("export", ["build", "{C}"],
                  {"EXPORT_DIR": "dir_in", "-o": "out", "--target": "str", "--opt-size": "size",
                   "--opt-batch": "int", "--trt": "str", "--timing-cache": "in"}),
        "calibrate": ("export", ["calibrate", "-c", "{C}", "-o", "{S}/cal.safetensors",
                                 "--samples", "1", "--steps", "1", "--height", "256", "--width",
                                 "896", "--no-progress", "--device", "cpu"],
                      {"-c": "dir_in", "-o": "out", "--prompts": "in", "--samples": "int",
                       "--steps": "int", "--height": "int", "--width": "int", "--seed": "int",
                       "--device": "device", "--dtype": "dtype"}),
        "quantize": ("export", ["quantize", "-c", "{C}", "-r", "int8-weight", "-o", "{S}/q"],
                     {"-c": "dir_in", "-r": "str", "-o": "out", "--calibration": "in"}),
        "convert": ("export", ["convert", "{F}/inet/pt/BitDance_tiny_1x.pt", "-o", "{S}/cv"],
                    {"MODEL_PT": "pt", "-a": "pt", "-o": "out", "--weights": "str"}),
    }
    # options that only matter with another one
    NEEDS = {("generate", "--export-dir"): ["--backend", "onnxruntime"],
             ("export", "--target"): ["--engines"], ("export", "--opt-size"): ["--engines"],
             ("export", "--opt-batch"): ["--engines"], ("export", "--trt"): ["--engines"],
             ("export", "--timing-cache"): ["--engines"]}
    # explicit output files that a command may legitimately write over
    EXEMPT = {("generate", "--out"), ("score", "--json")}

    def cli_case(self, d: Path, info, cmd: str, opt: str, value):
        app, base, _ = self.COMMANDS[cmd]
        (d / "notes-copy.txt").write_text("the user's file\n")
        sub = {"{S}": str(d), "{C}": str(self.ckpt), "{F}": str(self.fix)}
        args = [a for a in base]
        for k, v in sub.items():
            args = [a.replace(k, v) for a in args]
        value = str(value)
        if opt in ("IMAGE", "EXPORT_DIR", "MODEL_PT", "OUT_DIR"):  # the positional argument
            pos = 1 if cmd != "make-tiny" else None
            if pos is None:
                args = ["make-tiny", value]
            else:
                args[pos] = value
        elif opt in args:
            args[args.index(opt) + 1] = value
        else:
            args += [opt, value] + self.NEEDS.get((cmd, opt), [])
        info["repro"] = repro("bitdance-rt" if app == "rt" else "bitdance-export", args)
        before = snapshot(d)
        marker = getattr(self, "marker", None)
        r = invoke(app, args, timeout=45 if cmd in ("export", "build") else 120)
        info["result"] = r
        probs = judge(r)
        exempt = [value] if (cmd, opt) in self.EXEMPT else []
        probs += changed(before, snapshot(d), exempt)
        if marker is not None and marker.exists():
            probs.append("code inside the .pt file ran")
            marker.unlink()
        return probs

    def family_cli(self):
        names = list(self.COMMANDS)
        weights = [len(self.COMMANDS[n][2]) for n in names]
        for i in range(self.count("cli")):
            cmd = self.rng.choices(names, weights)[0]
            opt = self.rng.choice(sorted(self.COMMANDS[cmd][2]))
            kind = self.COMMANDS[cmd][2][opt]
            d = self.cases / f"cli-{i:03d}"  # the values name paths in the case directory
            value = self.rng.choice(self.values(kind, d))
            self.case("cli", i, self.cli_case, cmd, opt, value)

    # -- family: files ---------------------------------------------------------------------

    JSONS = ["config.json", "vision_head_config.json", "ae_config.json", "tokenizer_config.json"]
    SAFETENSORS = ["model.safetensors", "vision_head.safetensors", "ae.safetensors",
                   "projector.safetensors"]

    def damage_json(self, raw: bytes, rng: random.Random) -> tuple[bytes, str]:
        op = rng.choice(["flip", "truncate", "utf8", "nest", "type", "type", "huge", "whole",
                         "drop", "dup"])
        if op == "flip":
            b = bytearray(raw)
            for _ in range(rng.randint(1, 3)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            return bytes(b), "flipped bits"
        if op == "truncate":
            n = rng.randrange(len(raw))
            return raw[:n], f"truncated to {n} bytes"
        if op == "utf8":
            n = rng.randrange(len(raw))
            bad = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80\x80", b"\xfe\xff"])
            return raw[:n] + bad + raw[n:], f"{bad!r} inserted at byte {n}"
        if op == "nest":
            return b"[" * 10000 + b"1" + b"]" * 10000, "10000 nested lists"
        if op == "whole":
            body = rng.choice([b"[]", b"null", b'"x"', b"1", b"", b"\xef\xbb\xbf" + raw, b"{}"])
            return body, f"whole file replaced by {body[:20]!r}"
        data = json.loads(raw)
        paths = []

        def walk(o, path):
            if isinstance(o, dict):
                for k, v in o.items():
                    paths.append(path + [k])
                    walk(v, path + [k])
        walk(data, [])
        path = rng.choice(paths)
        parent = data
        for k in path[:-1]:
            parent = parent[k]
        old = parent[path[-1]]
        if op == "drop":
            del parent[path[-1]]
            return json.dumps(data).encode(), f"removed key {'.'.join(path)}"
        if op == "dup":
            text = json.dumps(data)[:-1] + f', "{path[0]}": [1, 2]}}'
            return text.encode(), f"duplicate key {path[0]!r} with value [1, 2]"
        if op == "huge":
            new = rng.choice([10**30, -10**30, 2**64, 10**400, 1e308, -1, 0])
        else:
            new = rng.choice([[old], str(old), None, {"v": old}, True, "", [], 1.5,
                              [[[[[]]]]]] + ([float(old)] if isinstance(old, int) else []))
        parent[path[-1]] = new
        text = json.dumps(data)
        return text.encode(), f"{'.'.join(path)}: {old!r:.40} -> {new!r:.60}"

    def damage_safetensors(self, raw: bytes, rng: random.Random) -> tuple[bytes, str]:
        n = struct.unpack("<Q", raw[:8])[0]
        op = rng.choice(["len", "flip", "flip", "truncate", "entry", "len_value"])
        if op == "len":
            b = bytearray(raw)
            i = rng.randrange(8)
            b[i] ^= 1 << rng.randrange(8)
            return bytes(b), f"bit flipped in header length byte {i}"
        if op == "len_value":
            v = rng.choice([0, 1, 2, n - 1, n + 1, len(raw), 2**63, 2**64 - 1])
            return struct.pack("<Q", v) + raw[8:], f"header length {n} -> {v}"
        if op == "flip":
            b = bytearray(raw)
            where = [8 + rng.randrange(n) for _ in range(rng.randint(1, 3))]
            for i in where:
                b[i] ^= 1 << rng.randrange(8)
            return bytes(b), f"bits flipped in the JSON header at {where}"
        if op == "truncate":
            cut = rng.choice([rng.randrange(8), 8 + rng.randrange(n),
                              8 + n + rng.randrange(len(raw) - 8 - n)])
            return raw[:cut], f"truncated to {cut} of {len(raw)} bytes"
        header = json.loads(raw[8:8 + n])
        name = rng.choice([k for k in header if k != "__metadata__"])
        e = header[name]
        field = rng.choice(["dtype", "shape", "data_offsets"])
        new = {"dtype": rng.choice(["I32", "F16", "BF16", "F64", "U8", "X9", 5, None]),
               "shape": rng.choice([e["shape"][::-1], e["shape"] + [1], [-1], [10**12], [],
                                    [d + 1 for d in e["shape"]], "12"]),
               "data_offsets": rng.choice([e["data_offsets"][::-1], [0, 10**15], [-4, 0],
                                           [e["data_offsets"][0] + 1, e["data_offsets"][1] + 1],
                                           [0]])}[field]
        if new == e[field]:
            new = [None]
        e[field] = new
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        return (struct.pack("<Q", len(h)) + h + raw[8 + n:],
                f"tensor {name}: {field} {e[field]!r:.60}")

    def copy_ckpt(self, src: Path, dst: Path, damaged: str):
        dst.mkdir()
        for p in src.iterdir():
            (shutil.copy2 if p.name == damaged else os.link)(p, dst / p.name)

    def baseline(self, src: Path, args: list[str]):
        """The undamaged checkpoint's image for ``args`` (pixels)."""
        out = self.work / "baseline" / (src.name + ".png")
        out.parent.mkdir(exist_ok=True)
        r = invoke("rt", ["generate", "-c", src, *args, "--out", out], timeout=300)
        if r.rc != 0:
            raise ProbeError(f"baseline generate failed: {r.tail()}")
        return pixels(out)

    def files_case(self, d: Path, info, src: Path, target: str, args: list[str], base):
        rng = random.Random(self.rng.random())
        raw = (src / target).read_bytes()
        if target.endswith(".json"):
            new, what = self.damage_json(raw, rng)
        else:
            new, what = self.damage_safetensors(raw, rng)
        ck = d / "ckpt"
        self.copy_ckpt(src, ck, target)
        (ck / target).write_bytes(new)
        out = d / "out.png"
        cmd = ["generate", "-c", ck, *args, "--out", out]
        info["repro"] = repro("bitdance-rt", cmd)
        info["inputs"] = f"{src.name}/{target} damaged: {what} (damaged copy in {ck})"
        r = invoke("rt", cmd, timeout=180)
        info["result"] = r
        probs = judge(r)
        if r.rc == 0:
            if not out.exists() or not png_ok(out):
                probs.append("exit 0 without a complete image")
            elif not (pixels(out) == base).all():
                probs.append("exit 0 with a different image: a silent wrong result")
        return probs

    def family_files(self):
        demo = self.fix / "demo"
        shutil.copytree(self.demo, demo)  # has bitdance_rt.json
        self.fixtures_snap = snapshot(self.fix)
        tiny_args = ["-p", "x", *GEN_FAST]
        demo_args = ["-p", "a red circle", "--steps", "2", "--no-progress", "--device", "cpu"]
        bases = {"ckpt": self.baseline(self.ckpt, tiny_args),
                 "demo": self.baseline(demo, demo_args)}
        for i in range(self.count("files")):
            if self.rng.random() < 0.8:
                src, args = self.ckpt, tiny_args
                target = self.rng.choice(self.JSONS * 2 + self.SAFETENSORS)
            else:
                src, args = demo, demo_args
                target = self.rng.choice(["bitdance_rt.json", "config.json", "model.safetensors"])
            self.case("files", i, self.files_case, src, target, args, bases[src.name])

    # -- family: exports (opt-in) --------------------------------------------------------------

    def exports_case(self, d: Path, info, exp: Path):
        rng = random.Random(self.rng.random())
        e = d / "exp"
        shutil.copytree(exp, e)
        op = rng.choice(["manifest", "manifest", "name", "onnx"])
        m = e / "manifest.json"
        if op == "manifest":
            new, what = self.damage_json(m.read_bytes(), rng)
            m.write_bytes(new)
        elif op == "name":
            data = json.loads(m.read_bytes())
            g = rng.choice(sorted(data["graphs"]))
            bad = rng.choice(["../x", "/etc/passwd", "../../ckpt/config.json", "a/../../b",
                              "", "decoder.onnx/.."])
            data["graphs"][g]["file"] = bad
            m.write_text(json.dumps(data, indent=2))
            what = f"graphs.{g}.file -> {bad!r}"
        else:
            f = rng.choice(sorted(e.glob("*.onnx")))
            b = bytearray(f.read_bytes())
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
            f.write_bytes(bytes(b))
            what = f"bit flipped in {f.name} at byte {i}"
        info["inputs"] = f"{what} (damaged copy in {e})"
        if rng.random() < 0.5:
            cmd, app, prog = ["check", e, "-c", self.ckpt, "--seed", "0"], "export", "bitdance-export"
        else:
            cmd, app, prog = (["generate", "--backend", "onnxruntime", "--export-dir", e, "-c",
                               self.ckpt, "-p", "x", *GEN_FAST, "--out", d / "o.png"], "rt",
                              "bitdance-rt")
        info["repro"] = repro(prog, cmd)
        r = invoke(app, cmd, timeout=300)
        info["result"] = r
        probs = judge(r, ok_codes=(1, 2) if app == "export" else (2,))
        if r.rc == 0:
            probs.append("accepted a damaged export")
        return probs

    def family_exports(self):
        exp = self.fix / "export"
        r = invoke("export", ["--checkpoint", self.ckpt, "--out", exp], timeout=900)
        if r.rc != 0:
            raise ProbeError(f"export failed: {r.tail()}")
        self.fixtures_snap = snapshot(self.fix)
        for i in range(self.count("exports")):
            self.case("exports", i, self.exports_case, exp)

    # -- family: server ----------------------------------------------------------------------

    def hostile(self, rng: random.Random):
        """A hostile request: (method, path, raw body or None, headers, expected images)."""
        url = "/v1/images/generations"
        pick = rng.random()
        if pick < 0.12:  # other routes and methods
            path = rng.choice(["/nope", "/v1/images", "/v1/images/generations/x", "/%00",
                               "/v1/../etc/passwd", "/" + "a" * 10000, "/\u202e", "/metrics/x",
                               "/v1/models/x", "//", "/healthz?x=" + "y" * 5000])
            method = rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH"])
            if rng.random() < 0.3:
                path, method = url, rng.choice(["GET", "PUT", "DELETE"])
            return method, path, None, {}, None
        if pick < 0.35:  # a whole body
            body = rng.choice([
                b"", b"null", b"[]", b'"x"', b"123", b"{", b"{not json", b"\xff\xfe{}",
                b"[" * 10000 + b"]" * 10000, b'{"prompt": ' * 5000 + b'"x"' + b"}" * 5000,
                '{"prompt": "a red circle"}'.encode("utf-16"), b"\xef\xbb\xbf{\"prompt\": \"x\"}",
                b'{"prompt": "x"} trailing', b'{"prompt": "x", "prompt": 5}',
                b'{"prompt": "x", "n": 1' + b"0" * 5000 + b"}", b'{"prompt": "\\ud800"}',
                b'{"prompt": "x", "seed": -Infinity}', b'{"prompt": "x", "steps": 1e999}',
                b'{"prompt": "' + b"x" * (2 << 20) + b'"}', b"\x00" * 100,
                b'{"' + b"k" * 100000 + b'": 1}', b'{"prompt": "x", "size": NaN}'])
            headers = rng.choice([{}, {"content-type": "text/plain"},
                                  {"content-type": "application/x-www-form-urlencoded"},
                                  {"content-encoding": "gzip"}])
            return "POST", url, body, headers, None
        body = {"prompt": "a red circle", "size": "128x128", "steps": 2}
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
        for token in ("NaN", "Infinity", "1e999"):  # bare tokens JSON does not allow
            text = text.replace(f'"{token}!"', token)
        n = body.get("n", 1)
        return "POST", url, text.encode(), {"content-type": "application/json"}, n

    def server_case(self, d: Path, info, client, req):
        method, path, body, headers, n = req
        shown = body if body is None or len(body) < 200 else body[:80] + b"...(%d bytes)" % len(body)
        info["repro"] = (f"{method} {path[:120]!r} body={shown!r} headers={headers} "
                         "(app from create_app over the demo model, --max-batch 4)")
        with watchdog(120) as dog:
            r = client.request(method, path, content=body, headers=headers)
        if dog["fired"]:
            return ["no answer within 120 s"]
        text = r.text
        probs = []
        if r.status_code >= 500:
            probs.append(f"status {r.status_code}")
        for leak in ("Traceback", 'File "', str(REPO), str(self.work), "site-packages"):
            if leak in text:
                probs.append(f"answer holds {leak!r}")
        if r.status_code >= 400:
            try:
                msg = r.json()["error"]["message"]
                if not isinstance(msg, str) or "\n" in msg:
                    probs.append("error message is not one line")
            except Exception:  # noqa: BLE001
                probs.append("error answer is not OpenAI's JSON error shape")
        elif r.status_code == 200 and path.startswith("/v1/images") and method == "POST":
            if r.headers.get("content-type", "").startswith("text/event-stream"):
                for ev in text.split("\n\n"):
                    if ev.startswith("event: error") and '"code": 5' in ev:
                        probs.append("stream ended in a 5xx error event")
            else:
                data = r.json().get("data", [])
                if isinstance(n, int) and len(data) != n:
                    probs.append(f"{len(data)} images for n={n}")
                for item in data:
                    p = d / "img.png"
                    p.write_bytes(base64.b64decode(item["b64_json"]))
                    if not png_ok(p):
                        probs.append("an answered image is not a complete PNG")
        if probs:
            info["said"] = f"status {r.status_code}: {text[-400:]!r}"
        return probs

    def family_server(self):
        from fastapi.testclient import TestClient
        from bitdance_rt.runtime.session import Session
        from bitdance_rt.serve.app import create_app
        from bitdance_rt.serve.config import ServeConfig
        from bitdance_rt.serve.service import ImageService

        session = Session.open(self.demo, device="cpu")
        service = ImageService(ServeConfig(max_batch=4, warmup=False, timeout=120), session)
        with TestClient(create_app(service, load="startup"), raise_server_exceptions=False) as c:
            for i in range(self.count("server")):
                self.case("server", i, self.server_case, c, self.hostile(self.rng))

    # -- family: signals -------------------------------------------------------------------

    def timed(self, app, args, cwd) -> float:
        t = time.monotonic()
        r = run_sub(app, args, self.env, cwd)
        if r.rc != 0:
            raise ProbeError(f"uninterrupted run failed: {r.tail()}")
        return time.monotonic() - t

    def signal_case(self, d: Path, info, what: str, sig: int, delay: float):
        name = signal.Signals(sig).name
        if what == "generate":
            args = ["generate", "-p", "a red circle", "-n", "2", "--out", d / "x.png",
                    "--no-progress", "--device", "cpu"]
            app = "rt"
        elif what == "serve":
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            args, app = ["serve", "--port", port, "--device", "cpu"], "rt"
        else:
            args, app = ["make-tiny", "--out", d / "t"], "export"
        info["repro"] = repro("bitdance-rt" if app == "rt" else "bitdance-export", args) + \
            f"  (then {name} after {delay:.2f} s)"
        p = spawn(app, args, self.env, d)
        time.sleep(delay)
        p.send_signal(sig)
        try:
            out, err = p.communicate(timeout=180)
            r = Result(p.returncode, out + err, err)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            r = Result(p.returncode, out + err, err, hung=True)
        info["result"] = r
        code = 128 + sig
        probs = judge(r, ok_codes=(0, code), signal_code=code)
        if "terminate called" in r.out:
            probs.append("'terminate called' (a C++ abort)")
        if what == "generate":
            imgs = sorted(d.glob("x*.png"))
            if r.rc == 0 and not (len(imgs) == 2 and all(map(png_ok, imgs))):
                probs.append(f"exit 0 but images {[p.name for p in imgs]} not both complete")
            if r.rc == code and imgs:
                probs.append(f"interrupted but left images {[p.name for p in imgs]}")
        elif what == "make-tiny":
            t = d / "t"
            if r.rc == 0 and self.tiny_ref is not None and snapshot_hashes(t) != self.tiny_ref:
                probs.append("exit 0 but the directory differs from a complete make-tiny")
            if r.rc == code and t.exists():
                probs.append("interrupted but left the output directory")
        return probs

    def family_signals(self):
        ref = self.work / "signal-ref"
        ref.mkdir()
        t_gen = self.timed("rt", ["generate", "-p", "a red circle", "-n", "2", "--out",
                                  ref / "x.png", "--no-progress", "--device", "cpu"], ref)
        t_tiny = self.timed("export", ["make-tiny", "--out", ref / "t"], ref)
        self.tiny_ref = snapshot_hashes(ref / "t")
        print(f"signals: one uninterrupted generate -n 2 takes {t_gen:.1f} s, make-tiny "
              f"{t_tiny:.1f} s", flush=True)
        n = self.count("signals")
        plan = ["generate"] * (n - n // 4 - n // 3) + ["serve"] * (n // 4) + ["make-tiny"] * (n // 3)
        for i, what in enumerate(plan):
            sig = self.rng.choice([signal.SIGINT, signal.SIGTERM])
            limit = {"generate": t_gen, "serve": 5.0, "make-tiny": t_tiny}[what]
            self.case("signals", i, self.signal_case, what, sig, self.rng.uniform(0, limit))

    # -- family: disks -----------------------------------------------------------------------

    @contextlib.contextmanager
    def tmpfs(self, where: Path, options: str):
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "none", str(where)],
                           capture_output=True, text=True)
        if r.returncode:
            raise ProbeError(f"mount -t tmpfs failed: {r.stderr.strip()}")
        try:
            yield where
        finally:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)

    def disk_case(self, d: Path, info, what: str, size_mb: int, fill: float, inodes):
        opts = f"size={size_mb}m" + (f",nr_inodes={inodes}" if inodes else "")
        with self.tmpfs(d / "mnt", opts) as m:
            if inodes:  # use up all but a few inodes
                for k in range(inodes):
                    try:
                        (m / f"f{k}").write_bytes(b"")
                    except OSError:
                        break
                for k in range(self.rng.randint(0, 2)):
                    with contextlib.suppress(OSError):
                        (m / f"f{k}").unlink()
            else:
                with contextlib.suppress(OSError):
                    (m / "fill").write_bytes(b"\0" * int(fill * size_mb * 2**20))
            before = snapshot(m)
            if what == "generate":
                k = self.rng.randint(1, 4)
                args, app = ["generate", "-p", "a red circle", "-n", k, "--steps", "2",
                             "--out", m / "x.png", "--no-progress", "--device", "cpu"], "rt"
            else:
                args, app = ["make-tiny", "--out", m / "t"], "export"
            info["repro"] = (repro("bitdance-rt" if app == "rt" else "bitdance-export", args)
                             + f"  (on a tmpfs -o {opts}, {fill:.0%} filled)")
            r = run_sub(app, args, self.env, d)
            info["result"] = r
            probs = judge(r)
            new = sorted(set(snapshot(m)) - set(before))
            probs += changed(before, snapshot(m))
            if r.rc == 2 and not re.search(r"space|room|inode", r.tail(1), re.I):
                probs.append("the error does not say the disk is full")
            if r.rc == 2 and new:
                probs.append(f"refused but left {new}")
            if r.rc == 0 and what == "generate":
                want = [m / "x.png"] if k == 1 else [m / f"x_{j}.png" for j in range(k)]
                if not all(p.exists() and png_ok(p) for p in want):
                    probs.append("exit 0 but not every image is complete")
            if r.rc == 0 and what == "make-tiny" and snapshot_hashes(m / "t") != self.tiny_hashes():
                probs.append("exit 0 but the checkpoint is not complete")
        return probs

    def tiny_hashes(self):
        if getattr(self, "tiny_ref", None) is None:
            ref = self.work / "tiny-ref"
            r = invoke("export", ["make-tiny", "--out", ref], timeout=300)
            if r.rc:
                raise ProbeError(f"make-tiny failed: {r.tail()}")
            self.tiny_ref = snapshot_hashes(ref)
        return self.tiny_ref

    def name_case(self, d: Path, info, length: int, multibyte: bool, what: str):
        limit = os.pathconf(d, "PC_NAME_MAX")
        if what == "generate":
            stem = ("\u00e9" * ((length - 4) // 2)) if multibyte else "a" * (length - 4)
            out = d / (stem + ".png")
            k = self.rng.randint(1, 3)
            args, app = ["generate", "-p", "a red circle", "-n", k, "--steps", "2", "--out", out,
                         "--no-progress", "--device", "cpu"], "rt"
        else:
            out = d / (("\u00e9" * (length // 2)) if multibyte else "t" * length)
            args, app = ["make-tiny", "--out", out], "export"
        info["repro"] = repro("bitdance-rt" if app == "rt" else "bitdance-export", args)
        info["inputs"] = f"--out name of {len(out.name.encode())} bytes (NAME_MAX {limit})"
        r = invoke(app, args, timeout=120)
        info["result"] = r
        return judge(r)

    def family_disks(self):
        n = self.count("disks")
        root_ok = os.geteuid() == 0
        if not root_ok:
            print("disks: not root: tmpfs cases skipped, only name-length cases", flush=True)
        for i in range(n):
            if root_ok and i % 2 == 0:
                kind = self.rng.choice(["generate", "generate", "make-tiny", "inodes"])
                if kind == "make-tiny":
                    args = ("make-tiny", self.rng.choice([2, 16, 24]), self.rng.random(), None)
                elif kind == "inodes":
                    args = ("generate", 2, 0.0, self.rng.randint(3, 8))
                else:
                    args = ("generate", 2, self.rng.random(), None)
                self.case("disks", i, self.disk_case, *args)
            else:
                limit = os.pathconf(self.cases, "PC_NAME_MAX")
                self.case("disks", i, self.name_case, self.rng.randint(limit - 30, limit + 3),
                          self.rng.random() < 0.3, self.rng.choice(["generate"] * 3 + ["make-tiny"]))

    # -- family: userfiles -------------------------------------------------------------------

    def userfiles_case(self, d: Path, info, cmd: str, scene: str):
        u = d / "user"
        ck, f = str(self.ckpt), self.fix
        earlier = {  # a complete earlier output of the command itself
            "make-tiny": ["make-tiny", "--out", u],
            "quantize": ["quantize", "-c", ck, "-r", "int8-weight", "-o", u],
            "convert": ["convert", f / "inet/pt/BitDance_tiny_1x.pt", "-o", u]}
        if scene in ("earlier", "earlier+clash"):
            if cmd not in earlier:
                raise ProbeError("no earlier output for " + cmd)
            r = invoke("export", earlier[cmd], timeout=300)
            if r.rc:
                raise ProbeError(f"could not make the earlier output: {r.tail()}")
        u.mkdir(exist_ok=True)
        (u / "notes.txt").write_text("the user's notes\n")
        (u / "sub").mkdir()
        (u / "sub" / "data.csv").write_text("1,2,3\n")
        if scene == "earlier+clash":
            (u / "sub" / "config.json").write_text("{}")
        if scene == "hidden-only":
            for p in (u / "notes.txt", u / "sub" / "data.csv"):
                p.unlink()
            (u / "sub").rmdir()
            (u / ".keep").write_text("")
        if scene == "clash":
            (u / "config.json").write_text('{"mine": true}\n')
        if scene == "inet-dir":  # the command's own input lives in the output directory
            shutil.copytree(f / "inet", u, dirs_exist_ok=True)
        target = {"dir": u, "earlier": u, "earlier+clash": u, "hidden-only": u, "clash": u,
                  "inet-dir": u, "file": u / "notes.txt", "under-file": u / "notes.txt" / "x",
                  "symlink": d / "link"}[scene]
        if scene == "symlink":
            target.symlink_to(u, target_is_directory=True)
        model = (u / "pt/BitDance_tiny_1x.pt") if scene == "inet-dir" else \
            f / "inet/pt/BitDance_tiny_1x.pt"
        args = {"make-tiny": ["make-tiny", "--out", target],
                "quantize": ["quantize", "-c", ck, "-r", "int8-weight", "-o", target],
                "convert": ["convert", model, "-o", target],
                "calibrate": ["calibrate", "-c", ck, "-o", target, "--samples", "1", "--steps",
                              "1", "--height", "256", "--width", "896", "--no-progress"],
                "export": ["-c", ck, "--out", target]}[cmd]
        info["repro"] = repro("bitdance-export", args)
        info["inputs"] = f"scene {scene}: --out holds notes.txt and sub/data.csv of the user's"
        before = snapshot(u)
        user = {p: v for p, v in before.items() if ("notes" in p or "/sub" in p or ".keep" in p
                                                    or "/pt" in p or scene == "clash")}
        r = invoke("export", args, timeout=60 if cmd == "export" else 300)
        info["result"] = r
        probs = judge(r)
        probs += changed(user, snapshot(u))
        return probs

    def family_userfiles(self):
        cmds = ["make-tiny", "quantize", "convert", "calibrate", "export"]
        scenes = ["dir", "earlier", "earlier+clash", "hidden-only", "clash", "file", "under-file",
                  "symlink", "inet-dir"]
        for i in range(self.count("userfiles")):
            cmd = self.rng.choice(cmds)
            ok = [s for s in scenes if not (s.startswith("earlier") and cmd in
                                            ("calibrate", "export"))
                  and not (s == "inet-dir" and cmd != "convert")
                  and not (s == "hidden-only" and cmd == "export")]
            self.case("userfiles", i, self.userfiles_case, cmd, self.rng.choice(ok))


def snapshot_hashes(d: Path) -> dict:
    import hashlib
    if not d.is_dir():
        return {}
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())
            if p.is_file()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    ap.add_argument("--quick", action="store_true", help="about 100 cases in about 2 minutes")
    ap.add_argument("--family", action="extend", nargs="+", choices=FAMILIES,
                    help="families to run (default: all but exports)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    a = ap.parse_args()
    families = a.family or DEFAULT
    work = Path(tempfile.mkdtemp(prefix="bitdance-probe-"))
    print(f"probe: seed {a.seed}, {'quick' if a.quick else 'default'} mode, families "
          f"{' '.join(families)}, work directory {work}", flush=True)
    t0 = time.monotonic()
    probe = Probe(a.seed, a.quick, work)
    try:
        probe.setup(families)
        for fam in FAMILIES:
            if fam in families:
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
    print(f"\nseed {a.seed}, {time.monotonic() - t0:.0f} s\n")
    print(f"{'family':<10} | {'cases':>5} | {'clean':>5} | {'failures':>8}")
    print("-" * 11 + "+" + "-" * 7 + "+" + "-" * 7 + "+" + "-" * 9)
    tot = [0, 0, 0]
    for fam in FAMILIES:
        if fam in probe.table:
            row = probe.table[fam]
            tot = [x + y for x, y in zip(tot, row)]
            print(f"{fam:<10} | {row[0]:>5} | {row[1]:>5} | {row[2]:>8}")
    print(f"{'total':<10} | {tot[0]:>5} | {tot[1]:>5} | {tot[2]:>8}")
    if probe.probe_errors:
        print(f"\n{len(probe.probe_errors)} probe error(s) (the probe's own setup, not findings):")
        for e in probe.probe_errors:
            print(f"  {e}")
    bad = bool(probe.failures or probe.probe_errors)
    if bad or a.keep:
        print(f"\nwork directory kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
