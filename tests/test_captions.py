"""Caption decomposition: the sentence splitter, PathFLIP's subcaption rule, the OpenAI-compatible
rewrite backend (against a loopback server) and the decompose_captions job."""

from __future__ import annotations

import contextlib
import csv
import http.server
import json
import socket
import threading
import time

import numpy as np
import pytest

from data_prep import decompose_captions
from pathflip_jax.data import captions as C

DEMO = ("Sheets of tumour cells with large pleomorphic hyperchromatic nuclei can be seen in the "
        "centre, measuring about 0.4 mm across. Fibrous stroma can be noted on the left side. "
        "Diagnosis: invasive carcinoma.")


# --- splitter --------------------------------------------------------------------------------


def test_split_demo_caption():
  assert C.split_sentences(DEMO) == [
      "Sheets of tumour cells with large pleomorphic hyperchromatic nuclei can be seen in the "
      "centre, measuring about 0.4 mm across.",
      "Fibrous stroma can be noted on the left side.",
      "Diagnosis: invasive carcinoma."]


@pytest.mark.parametrize("text, expected", [
    ("The lesion measures 1.5 mm. Margins are clear.",
     ["The lesion measures 1.5 mm.", "Margins are clear."]),
    ("Tumour size 2.25 cm, depth 0.8 mm.", ["Tumour size 2.25 cm, depth 0.8 mm."]),
    ("Mitoses are frequent, e.g. 12 per HPF. Necrosis is present, i.e. Comedo type.",
     ["Mitoses are frequent, e.g. 12 per HPF.", "Necrosis is present, i.e. Comedo type."]),
    ("The tumour is approx. 3 mm deep. Reviewed by Dr. Smith vs. Dr. Jones.",
     ["The tumour is approx. 3 mm deep.", "Reviewed by Dr. Smith vs. Dr. Jones."]),
    ("Block No. 3 shows tumour (cf. Fig. 2). As described by Smith et al. The grade is 2.",
     ["Block No. 3 shows tumour (cf. Fig. 2).",
      "As described by Smith et al. The grade is 2."]),
    ("Invasion depth ca. 4 mm. Margin involved? No. Lymph nodes negative!",
     ["Invasion depth ca. 4 mm.", "Margin involved?", "No.", "Lymph nodes negative!"]),
    ("Findings were equivocal... Further sections advised. Grade 2 of 3. 5 nodes negative.",
     ["Findings were equivocal...", "Further sections advised.", "Grade 2 of 3.",
      "5 nodes negative."]),
    ("Nuclei are enlarged ... and crowded. Stroma is scant.",
     ["Nuclei are enlarged ... and crowded.", "Stroma is scant."]),
    ('He said "tumour present." Then left.', ['He said "tumour present."', "Then left."]),
])
def test_split_decimals_abbreviations_ellipses(text, expected):
  assert C.split_sentences(text) == expected


def test_split_bullets_and_newlines():
  text = ("Microscopy:\n"
          "- Invasive carcinoma in the upper left\n"
          "* Necrosis in the centre.\n"
          "1. Stroma on the left, 1.5 mm wide\n"
          "2) Fat at the margin\n"
          "  \n"
          "Margins: clear\n"
          "The tumour measures\n"
          "about 3 mm across. Grade 2.")
  assert C.split_sentences(text) == [
      "Microscopy:", "Invasive carcinoma in the upper left", "Necrosis in the centre.",
      "Stroma on the left, 1.5 mm wide", "Fat at the margin", "Margins: clear",
      "The tumour measures about 3 mm across.", "Grade 2."]


@pytest.mark.parametrize("text", ["", "   ", "\n\n", "- \n* ", "...", "---"])
def test_split_empty(text):
  assert C.split_sentences(text) == []


def test_split_collapses_whitespace():
  assert C.split_sentences("  Two   spaces.\tA   tab.  ") == ["Two spaces.", "A tab."]


# --- subcaption sampler ----------------------------------------------------------------------


@pytest.mark.parametrize("n, k", [(1, 8), (2, 8), (3, 1), (5, 8), (12, 7), (40, 8), (6, 0)])
def test_sample_indices_rule(n, k):
  for seed in range(20):
    groups = C.sample_subcaption_indices(n, k, np.random.default_rng(seed))
    assert len(groups) == k
    for i, group in enumerate(groups):
      assert isinstance(group, tuple) and all(type(j) is int for j in group)
      assert 1 <= len(group) <= min(3, n)
      assert all(0 <= j < n for j in group)
      assert list(group) == sorted(set(group))
      if i < (k + 1) // 2:
        assert list(group) == list(range(group[0], group[0] + len(group)))


def test_sample_indices_edge_cases():
  assert C.sample_subcaption_indices(1, 8, np.random.default_rng(0)) == [(0,)] * 8
  seen = set()
  for seed in range(30):
    seen.update(C.sample_subcaption_indices(2, 8, np.random.default_rng(seed)))
  assert seen == {(0,), (1,), (0, 1)}
  assert all(len(g) <= 5 for g in C.sample_subcaption_indices(9, 8, np.random.default_rng(0),
                                                              max_sentences=5))
  with pytest.raises(ValueError, match="num_sentences"):
    C.sample_subcaption_indices(0, 8, np.random.default_rng(0))
  with pytest.raises(ValueError, match="without sentences"):
    C.sample_subcaptions([], 8, np.random.default_rng(0))


def test_sample_indices_reproducible_and_not_stuck():
  a = C.sample_subcaption_indices(10, 8, np.random.default_rng(3))
  assert a == C.sample_subcaption_indices(10, 8, np.random.default_rng(3))
  assert a != C.sample_subcaption_indices(10, 8, np.random.default_rng(4))
  rng = np.random.default_rng(0)
  consecutive_used, random_used, lengths = set(), set(), set()
  for _ in range(200):
    groups = C.sample_subcaption_indices(10, 8, rng)
    for group in groups[:4]:
      consecutive_used.update(group)
    for group in groups[4:]:
      random_used.update(group)
      lengths.add(len(group))
  assert consecutive_used == random_used == set(range(10))
  assert lengths == {1, 2, 3}


def test_sample_subcaptions_joins_in_report_order():
  sentences = C.split_sentences(DEMO)
  subcaptions = C.sample_subcaptions(sentences, 8, np.random.default_rng(0))
  assert len(subcaptions) == 8
  for text in subcaptions:
    picked = [s for s in sentences if s in text]
    assert text == " ".join(picked)


# --- loopback chat-completions server --------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
  def log_message(self, *args):
    pass

  def _reply(self, status: int, body: str) -> None:
    data = body.encode()
    try:
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)
    except (BrokenPipeError, ConnectionResetError):
      pass  # the client timed out (the "slow" mode) and hung up

  def do_POST(self):
    server = self.server
    with server.lock:
      server.calls += 1
      call = server.calls
    request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    if self.path != "/v1/chat/completions":
      return self._reply(404, '{"error": "no such route"}')
    if self.headers.get("Authorization") != "Bearer sekret":
      return self._reply(401, '{"error": "bad key"}')
    if request.get("model") != "path-llm" or request.get("temperature") != 0.0:
      return self._reply(400, '{"error": "unknown model"}')
    roles = [m["role"] for m in request["messages"]]
    assert roles == ["system", "user"] and "JSON array" in request["messages"][0]["content"]
    user = request["messages"][1]["content"]
    findings = [s.upper() for s in C.split_sentences(user)]
    mode = server.mode
    if mode == "flaky" and call <= 2:
      return self._reply(500, "overloaded, try later")
    if mode == "bad":
      return self._reply(400, '{"error": "model path-llm does not support this request"}')
    if mode == "slow":
      time.sleep(0.5)
    if mode == "mixed" and "FAIL" in user:
      return self._reply(503, "backend crashed")
    if mode == "fenced":
      content = "Here are the findings:\n```json\n" + json.dumps(findings) + "\n```\n"
    elif mode == "bullets":
      content = "Findings:\n" + "\n".join(
          f"- {f}" if i % 2 else f"{i + 1}. {f}" for i, f in enumerate(findings))
    elif mode == "empty":
      content = "[]"
    else:
      content = json.dumps(findings)
    self._reply(200, json.dumps({"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": content},
         "finish_reason": "stop"}]}))


@contextlib.contextmanager
def _server(mode: str = "ok"):
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  server.mode, server.calls, server.lock = mode, 0, threading.Lock()
  thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                            daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", server
  finally:
    server.shutdown()
    server.server_close()
    thread.join()


def _backend(url: str, **kwargs) -> C.OpenAIChatBackend:
  kwargs.setdefault("api_key", "sekret")
  return C.OpenAIChatBackend(url, "path-llm", backoff=0.02, **kwargs)


def test_openai_backend_returns_the_model_findings():
  with _server() as (url, server):
    backend = _backend(url + "/")  # a trailing slash is fine
    assert backend.rewrite(DEMO, "s1") == [s.upper() for s in C.split_sentences(DEMO)]
    assert server.calls == 1
    assert "sekret" not in repr(backend)
    with pytest.raises(C.RewriteError, match="HTTP 401"):
      _backend(url, api_key=None).rewrite(DEMO, "s1")


@pytest.mark.parametrize("mode", ["fenced", "bullets"])
def test_openai_backend_parses_fences_and_bullets(mode):
  with _server(mode) as (url, _):
    assert _backend(url).rewrite(DEMO, "s1") == [s.upper() for s in C.split_sentences(DEMO)]


def test_openai_backend_retries_server_errors():
  with _server("flaky") as (url, server):
    assert _backend(url, max_retries=3).rewrite(DEMO, "s1")[0].startswith("SHEETS")
    assert server.calls == 3
  with _server("flaky") as (url, server):
    with pytest.raises(C.RewriteError, match="HTTP 500") as e:
      _backend(url, max_retries=1).rewrite(DEMO, "s1")
    assert server.calls == 2 and e.value.status == 500 and "after 2 attempts" in str(e.value)


def test_openai_backend_client_error_is_not_retried():
  with _server("bad") as (url, server):
    with pytest.raises(C.RewriteError) as e:
      _backend(url, max_retries=3).rewrite(DEMO, "slide-7")
    assert server.calls == 1
  message = str(e.value)
  assert f"{url}/chat/completions" in message and "'slide-7'" in message
  assert "HTTP 400" in message and "does not support this request" in message
  assert e.value.status == 400 and e.value.slide_id == "slide-7"


def test_openai_backend_empty_reply_timeout_and_refused_connection():
  with _server("empty") as (url, _):
    with pytest.raises(C.RewriteError, match="no findings"):
      _backend(url).rewrite(DEMO, "s1")
  with _server("slow") as (url, server):
    with pytest.raises(C.RewriteError, match="(?i)timed out") as e:
      _backend(url, timeout=0.1, max_retries=1).rewrite(DEMO, "s1")
    assert e.value.status is None and server.calls == 2
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  with pytest.raises(C.RewriteError, match=f"127.0.0.1:{port}/v1/chat/completions"):
    _backend(f"http://127.0.0.1:{port}/v1", max_retries=1).rewrite(DEMO, "s1")


@pytest.mark.parametrize("content, expected", [
    ('["A left.", " B right. "]', ["A left.", "B right."]),
    ('```\n["A."]\n```', ["A."]),
    ('{"findings": ["A.", "B."]}', ["A.", "B."]),
    ('Sure! ["A.", "B."] Hope this helps.', ["A.", "B."]),
    ("<think>the report says [x]</think>\n[\"A.\"]", ["A."]),
    ("1) A in the centre.\n\n2) B at 1.5 mm.\n* C.", ["A in the centre.", "B at 1.5 mm.", "C."]),
    ("", []),
    ("- Lesions at sites [1, 2].\n- Stroma.", ["Lesions at sites [1, 2].", "Stroma."]),
])
def test_parse_findings(content, expected):
  assert C.parse_findings(content) == expected


def test_parse_findings_rejects_arrays_of_objects():
  with pytest.raises(ValueError, match="item 0 is not a string"):
    C.parse_findings('[{"region": "centre"}]')


def test_make_backend():
  assert isinstance(C.make_backend("rule"), C.RuleBackend)
  assert isinstance(C.make_backend("rule"), C.RewriteBackend)
  backend = C.make_backend("openai", base_url="http://127.0.0.1:1/v1", model="m")
  assert backend.url == "http://127.0.0.1:1/v1/chat/completions"
  with pytest.raises(ValueError, match="known: openai, rule"):
    C.make_backend("gpt5")
  assert C.RuleBackend().rewrite(DEMO) == C.split_sentences(DEMO)
  with pytest.raises(C.RewriteError):
    C.RuleBackend().rewrite("...", "s1")


# --- decompose_captions job ------------------------------------------------------------------

SLIDES = [(f"s{i}", f"Tumour {i} is seen in the centre. Stroma lies on the left, {i}.5 mm "
           f"wide. Diagnosis: carcinoma {i}.") for i in range(6)]


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def _read(path):
  return [json.loads(line) for line in open(path) if line.strip()]


def test_job_rule_jsonl_with_bad_rows(tmp_path, capsys):
  rows = [{"slide_id": s, "caption": c, "path": f"{s}.svs"} for s, c in SLIDES]
  rows.insert(2, {"caption": "No slide id."})
  rows.insert(4, {"slide_id": "s-empty", "caption": "  "})
  source = _write_jsonl(tmp_path / "manifest.jsonl", rows)
  out = str(tmp_path / "out" / "sentences.jsonl")
  summary = decompose_captions.run(["--input", source, "--output", out])
  err = capsys.readouterr().err
  assert f"{source}:3: no slide_id" in err and f"{source}:5: slide 's-empty'" in err
  assert "done 6 | already done 0 | skipped 2 | failed 0" in err
  assert (summary["done"], summary["skipped"], summary["failed"]) == (6, 2, 0)
  written = _read(out)
  assert [r["slide_id"] for r in written] == [s for s, _ in SLIDES]
  for row, (_, caption) in zip(written, SLIDES):
    assert row == {"slide_id": row["slide_id"], "caption": caption,
                   "sentences": C.split_sentences(caption), "backend": "rule", "model": None}
    assert len(row["sentences"]) == 3
  assert C.read_sentences(out) == {r["slide_id"]: r["sentences"] for r in written}


def test_job_rule_csv_limit_and_directory(tmp_path):
  with open(tmp_path / "manifest.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=["slide_id", "path", "caption"])
    writer.writeheader()
    for s, c in SLIDES:
      writer.writerow({"slide_id": s, "path": f"{s}.svs", "caption": c})
  out = tmp_path / "a.jsonl"
  summary = decompose_captions.run(["--input", str(tmp_path / "manifest.csv"),
                                    "--output", str(out), "--limit", "2"])
  assert summary["total"] == 2 and [r["slide_id"] for r in _read(out)] == ["s0", "s1"]
  # A demo-cohort-like directory: captions.jsonl with sentences as {"text": ...}.
  cohort = tmp_path / "cohort"
  cohort.mkdir()
  _write_jsonl(cohort / "captions.jsonl", [
      {"slide_id": s, "caption": c, "sentences": [{"text": c, "region_id": 1}]}
      for s, c in SLIDES])
  summary = decompose_captions.run(["--input", str(cohort), "--output", str(tmp_path / "b.jsonl")])
  assert summary["done"] == 6 and summary["input"].endswith("captions.jsonl")
  assert len(C.read_sentences(str(cohort / "captions.jsonl"))["s0"]) == 1


def test_job_duplicate_slide_id(tmp_path):
  source = _write_jsonl(tmp_path / "m.jsonl", [{"slide_id": "a", "caption": "A."},
                                               {"slide_id": "b", "caption": "B."},
                                               {"slide_id": "a", "caption": "C."}])
  with pytest.raises(decompose_captions.DecomposeError,
                     match=r"m.jsonl:3: slide_id 'a' already used on line 1"):
    decompose_captions.run(["--input", source, "--output", str(tmp_path / "o.jsonl")])
  with pytest.raises(SystemExit) as e:
    decompose_captions.main(["--input", source, "--output", str(tmp_path / "o.jsonl")])
  assert e.value.code == 2


@pytest.mark.parametrize("damage", ["delete_last", "truncated", "truncated_newline",
                                    "no_final_newline"])
def test_job_resumes(tmp_path, damage):
  source = _write_jsonl(tmp_path / "m.jsonl", [{"slide_id": s, "caption": c}
                                               for s, c in SLIDES])
  out = tmp_path / "o.jsonl"
  argv = ["--input", source, "--output", str(out)]
  decompose_captions.run(argv)
  lines = out.read_text().splitlines(keepends=True)
  if damage == "delete_last":
    out.write_text("".join(lines[:-1]))
  elif damage == "truncated":
    out.write_text("".join(lines[:-1]) + lines[-1][:25])
  elif damage == "truncated_newline":
    out.write_text("".join(lines[:-2]) + lines[-2][:30] + "\n")
  else:
    out.write_text("".join(lines).rstrip("\n"))
  summary = decompose_captions.run(argv)
  expected_done = {"delete_last": 1, "truncated": 1, "truncated_newline": 2,
                   "no_final_newline": 0}[damage]
  assert summary["done"] == expected_done
  assert summary["resumed"] == len(SLIDES) - expected_done
  ids = [r["slide_id"] for r in _read(out)]
  assert sorted(ids) == sorted(s for s, _ in SLIDES) and len(ids) == len(set(ids))
  # A bad line that is not the last one is not silently dropped.
  out.write_text('{"slide_id": "x"\n' + out.read_text())
  with pytest.raises(decompose_captions.DecomposeError, match="o.jsonl:1:"):
    decompose_captions.run(argv)


def test_job_openai_end_to_end(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("PATH_LLM_KEY", "sekret")
  source = _write_jsonl(tmp_path / "m.jsonl", [{"slide_id": s, "caption": c}
                                               for s, c in SLIDES])
  out = tmp_path / "o.jsonl"
  with _server() as (url, server):
    argv = ["--input", source, "--output", str(out), "--backend", "openai", "--base_url", url,
            "--model", "path-llm", "--api_key_env", "PATH_LLM_KEY", "--workers", "3"]
    summary = decompose_captions.run(argv)
    assert summary["done"] == len(SLIDES) and summary["failed"] == 0
    assert server.calls == len(SLIDES)
    rows = {r["slide_id"]: r for r in _read(out)}
    assert set(rows) == {s for s, _ in SLIDES}
    for s, caption in SLIDES:
      assert rows[s]["sentences"] == [x.upper() for x in C.split_sentences(caption)]
      assert (rows[s]["backend"], rows[s]["model"], rows[s]["caption"]) == (
          "openai", "path-llm", caption)
    assert decompose_captions.run(argv)["resumed"] == len(SLIDES)
    assert server.calls == len(SLIDES)
  assert "sekret" not in capsys.readouterr().err
  monkeypatch.delenv("PATH_LLM_KEY")
  with pytest.raises(SystemExit):
    decompose_captions.run(argv)  # the named variable is not set


def test_job_openai_failures_and_fallback(tmp_path):
  rows = [{"slide_id": s, "caption": c + (" FAIL now." if s in ("s1", "s4") else "")}
          for s, c in SLIDES]
  source = _write_jsonl(tmp_path / "m.jsonl", rows)
  out = tmp_path / "o.jsonl"
  failures = tmp_path / "o.jsonl.failures.jsonl"
  with _server("mixed") as (url, server):
    argv = ["--input", source, "--output", str(out), "--backend", "openai", "--base_url", url,
            "--model", "path-llm", "--max_retries", "0", "--api_key_env", "PATH_LLM_KEY"]
    env = {"PATH_LLM_KEY": "sekret"}
    with pytest.MonkeyPatch.context() as mp:
      for k, v in env.items():
        mp.setenv(k, v)
      with pytest.raises(SystemExit) as e:
        decompose_captions.main(argv)
      assert e.value.code == 1
      failed = _read(failures)
      assert sorted(f["slide_id"] for f in failed) == ["s1", "s4"]
      assert all("HTTP 503" in f["error"] and url in f["error"] for f in failed)
      assert sorted(r["slide_id"] for r in _read(out)) == ["s0", "s2", "s3", "s5"]
      calls = server.calls
      # Re-run with --fallback: only the failed slides are tried again, and get the rule split.
      summary = decompose_captions.run(argv + ["--fallback"])
      assert server.calls == calls + 2
  assert (summary["done"], summary["failed"], summary["fallback"]) == (2, 0, 2)
  assert summary["resumed"] == 4 and not failures.exists()
  written = {r["slide_id"]: r for r in _read(out)}
  assert len(written) == len(SLIDES)
  for s in ("s1", "s4"):
    assert written[s]["backend"] == "rule-fallback" and written[s]["model"] is None
    assert written[s]["sentences"] == C.split_sentences(rows[int(s[1])]["caption"])
    assert "HTTP 503" in written[s]["error"]
  assert written["s0"]["backend"] == "openai"
