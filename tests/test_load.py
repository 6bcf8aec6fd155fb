"""Many users on loopback: bounded queue, no cross-talk, per-session cancel, memory comes back."""

from __future__ import annotations

import gc
import threading
from concurrent.futures import ThreadPoolExecutor

import psutil
from gradio_client import Client

from app.backends.scripted import ScriptedBackend

from .app_support import running_app

SESSIONS, REQUESTS = 8, 10


def echo(conversation) -> str:
    return f"answer for {conversation[-1].text}"


def test_eight_sessions_ten_requests_each_without_cross_talk(tmp_path):
    backend = ScriptedBackend(echo)
    process = psutil.Process()
    with running_app(backend, tmp_path, max_size=64) as url:
        warm = Client(url, verbose=False)
        assert warm.predict("warm up", [], [], "Ask", 64, 0.0, api_name="/chat")["text"] == "answer for warm up"
        gc.collect()
        rss_start = process.memory_info().rss

        def user(index: int) -> list[tuple[str, str]]:
            client = Client(url, verbose=False)
            seen = []
            for request in range(REQUESTS):
                question = f"session {index} request {request}"
                try:
                    result = client.predict(question, [], [], "Ask", 64, 0.0, api_name="/chat")
                    seen.append((question, result["text"]))
                except Exception as exc:  # only a full queue may refuse us
                    assert "queue" in str(exc).lower(), exc
                    seen.append((question, "rejected: queue full"))
            return seen

        with ThreadPoolExecutor(SESSIONS) as pool:
            results = list(pool.map(user, range(SESSIONS), timeout=300))
        gc.collect()
        rss_end = process.memory_info().rss
    answered = [(q, a) for session in results for q, a in session if not a.startswith("rejected")]
    assert len(answered) >= SESSIONS * REQUESTS * 0.9
    for question, answer in answered:
        assert answer == f"answer for {question}", "a session saw another session's data"
    assert rss_end - rss_start < 150 * 2**20, f"memory grew by {(rss_end - rss_start) / 2**20:.0f} MiB"


def test_cancelling_one_stream_stops_its_generation_while_others_continue(tmp_path):
    slow_gate = threading.Semaphore(0)
    long_text = " ".join(f"word{i}" for i in range(500))

    def script(conversation):
        return long_text if conversation[-1].text == "slow" else echo(conversation)

    backend = ScriptedBackend(script, gate=lambda conversation: slow_gate if conversation[-1].text == "slow" else None)
    with running_app(backend, tmp_path, max_size=64) as url:
        slow_client = Client(url, verbose=False)
        slow_job = slow_client.submit("slow", [], [], "Ask", 1000, 0.0, api_name="/chat")
        slow_gate.release()
        slow_gate.release()
        outputs = iter(slow_job)
        while "word1" not in next(outputs)["text"]:
            pass
        record = backend.records[-1]
        others = [
            Client(url, verbose=False).submit(f"other {i}", [], [], "Ask", 64, 0.0, api_name="/chat") for i in range(3)
        ]
        canceller = threading.Thread(target=slow_job.cancel)
        canceller.start()
        # Like a real model, the stream keeps producing tokens (one per release) until the cancel
        # reaches it; then it must stop at its next step.
        for _ in range(400):
            if record.cancel_event.is_set():
                break
            slow_gate.release()
            record.cancel_event.wait(timeout=0.05)
        assert record.cancel_event.is_set(), "the cancel never reached the generation"
        sent_at_cancel = record.pieces_sent
        slow_gate.release()
        assert record.finished.wait(timeout=60)
        canceller.join(timeout=60)
        answers = [job.result(timeout=120)["text"] for job in others]
    assert record.cancelled_at is not None and record.pieces_sent - sent_at_cancel <= 1
    assert record.pieces_sent < record.pieces_total
    assert answers == [f"answer for other {i}" for i in range(3)]
