"""The cloud bridge: a plan stage's tensors arrive byte-identical over TLS, a dropped transfer
resumes at the first unverified chunk, a corrupted chunk is detected and fetched again, hostile
requests and replies are refused before anything is allocated, and a second fetch reads the cache."""
from __future__ import annotations

import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from vramancer.link.bridge import BridgeError, BridgeServer, FetchStats, fetch_tensors
from vramancer.link.errors import FrameError, LinkError
from vramancer.link.frame import FrameType, FrameWriter, TensorDesc
from vramancer.link.tcp import TcpTransport

from .conftest import in_thread

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

CHUNK = 4096


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny Llama saved as a sharded safetensors checkpoint."""
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("bridge") / "llama"
    model.save_pretrained(out, safe_serialization=True, max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").is_file()
    return out


@pytest.fixture(scope="module")
def reference(folder) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(safetensors_torch.load_file(f))
    return out


def _server(folder, names=None, cls=BridgeServer):
    from vramancer.hub.bridge import checkpoint_tensors

    return cls(checkpoint_tensors(folder).values(), names, chunk_bytes=CHUNK)


def _serve_all(server, listener, n):
    """Serve ``n`` connections one after the other; a connection that breaks is skipped."""
    def body():
        for _ in range(n):
            conn = listener.accept(30)
            try:
                server.serve(conn)
            except LinkError:
                pass
    return in_thread(body)


def _identical(got: dict, reference: dict, names) -> None:
    assert sorted(got) == sorted(names)
    for n in names:
        assert got[n].dtype == reference[n].dtype and got[n].shape == reference[n].shape
        assert got[n].contiguous().view(torch.uint8).numpy().tobytes() == \
            reference[n].contiguous().view(torch.uint8).numpy().tobytes(), n


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _chunks(reference, names) -> int:
    return sum(-(-_nbytes(reference[n]) // CHUNK) for n in names)


def _distinct(reference, names) -> list[str]:
    """``names`` less those whose bytes repeat an earlier one's (the bridge moves those once)."""
    seen, out = set(), []
    for n in names:
        key = reference[n].contiguous().view(torch.uint8).numpy().tobytes()
        if key not in seen:
            seen.add(key)
            out.append(n)
    return out


def test_a_plan_stage_arrives_byte_identical_over_tls(folder, reference, nodes):
    from vramancer.hub.bridge import stage_names
    from vramancer.link.tls import TlsTransport
    from vramancer.plan.planner import plan

    p = plan(str(folder), devices="rtx3090,rtx3060", split=[1, 1], context=64)
    names = stage_names(folder, p, [1])
    assert names and set(names) < set(reference)
    assert not any(".layers.0." in n for n in names)            # stage 0's blocks stay home
    server = _server(folder, names)                              # this node offers only stage 1
    srv = TlsTransport(nodes.identity("b"), nodes.trust("b", "a"))
    listener = srv.listen(("127.0.0.1", 0))
    served = _serve_all(server, listener, 1)
    cli = TlsTransport(nodes.identity("a"), nodes.trust("a", "b"))
    stats = FetchStats()
    got = fetch_tensors(cli.connect(listener.address), names, stats=stats)
    served.result()
    listener.close()
    _identical(got, reference, names)
    distinct = _distinct(reference, names)
    total = sum(_nbytes(reference[n]) for n in distinct)
    assert stats.chunk_bytes_from_network == total == server.stats.chunk_bytes_sent
    assert stats.chunks_from_network == _chunks(reference, distinct) and stats.chunks_refetched == 0
    assert stats.chunks_deduplicated == _chunks(reference, names) - _chunks(reference, distinct)


def test_preallocated_destinations_are_filled_in_place(folder, reference):
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    server = _server(folder)
    listener = TcpTransport().listen(("127.0.0.1", 0))
    served = _serve_all(server, listener, 2)
    dest = {n: torch.empty_like(reference[n]) for n in names}
    got = fetch_tensors(TcpTransport().connect(listener.address), names, dest=dest)
    assert all(got[n] is dest[n] for n in names)
    _identical(got, reference, names)
    wrong = {"model.norm.weight": torch.empty(31)}
    with pytest.raises(BridgeError, match="destination of 'model.norm.weight'"):
        fetch_tensors(TcpTransport().connect(listener.address), names, dest=wrong)
    served.result()
    listener.close()


class _CuttingProxy:
    """Forwards TCP connections to ``upstream``; the first one is cut after ``cut_after`` bytes
    from the server."""

    def __init__(self, upstream, cut_after: int) -> None:
        self.upstream, self.cut_after = upstream, cut_after
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = self.sock.getsockname()[:2]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.sock.accept()
            except OSError:
                return
            up = socket.create_connection(self.upstream)
            limit = self.cut_after if self.connections == 0 else None
            self.connections += 1
            threading.Thread(target=self._pump, args=(down, up, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, down, limit), daemon=True).start()

    @staticmethod
    def _pump(src, dst, limit) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if limit is not None and sent + len(data) >= limit:
                    dst.sendall(data[:limit - sent])
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.sock.close()


def test_a_dropped_transfer_resumes_at_the_first_unverified_chunk(folder, reference):
    names = sorted(reference)
    total = sum(_nbytes(reference[n]) for n in _distinct(reference, names))
    server = _server(folder)
    listener = TcpTransport().listen(("127.0.0.1", 0))
    served = _serve_all(server, listener, 2)
    proxy = _CuttingProxy(listener.address, cut_after=total // 2)
    stats = FetchStats()
    got = fetch_tensors(lambda: TcpTransport().connect(proxy.address), names, stats=stats)
    served.result()
    proxy.close()
    listener.close()
    _identical(got, reference, names)
    assert stats.reconnects == 1 and proxy.connections == 2
    # every verified chunk crossed exactly once: nothing received twice
    assert stats.chunk_bytes_from_network == total
    assert stats.chunks_from_network == _chunks(reference, _distinct(reference, names))
    asked = stats.requested_chunks
    assert len(asked) > len(set(asked))                      # the chunks lost in the cut were asked again
    resent = len(asked) - len(set(asked))
    # ... and only those, not the first half again
    assert 0 < resent < _chunks(reference, _distinct(reference, names)) // 2 + 2
    print(f"re-sent after the cut: {resent} chunks, {server.stats.chunk_bytes_sent - total} bytes from the server")


def test_a_dropped_transfer_resumes_from_the_cache_in_a_new_process(folder, reference, tmp_path):
    names = sorted(reference)
    distinct = _distinct(reference, names)
    total = sum(_nbytes(reference[n]) for n in distinct)
    server = _server(folder)
    listener = TcpTransport().listen(("127.0.0.1", 0))
    served = _serve_all(server, listener, 2)
    proxy = _CuttingProxy(listener.address, cut_after=total // 2)
    first = FetchStats()
    with pytest.raises(LinkError):
        fetch_tensors(TcpTransport().connect(proxy.address), names, cache_dir=tmp_path, stats=first)
    assert 0 < first.chunks_from_network < _chunks(reference, distinct)
    assert list(tmp_path.glob("*.bin")) or list(tmp_path.glob("*.part.json"))   # progress kept
    second = FetchStats()
    got = fetch_tensors(TcpTransport().connect(listener.address), names, cache_dir=tmp_path, stats=second)
    served.result()
    proxy.close()
    listener.close()
    _identical(got, reference, names)
    assert second.chunks_from_cache == first.chunks_from_network
    assert second.chunks_from_cache + second.chunks_from_network == _chunks(reference, distinct)
    assert second.chunks_deduplicated == _chunks(reference, names) - _chunks(reference, distinct)
    assert not list(tmp_path.glob("*.part*")) and len(list(tmp_path.glob("*.bin"))) == len(distinct)


class _FlippingServer(BridgeServer):
    """Flips one bit of chunk 1 of ``target`` the first ``times`` times it is sent."""

    target = "model.embed_tokens.weight"
    times = 1

    def read_chunk(self, t, lo, hi, buf):
        out = super().read_chunk(t, lo, hi, buf)
        if t.name == self.target and lo == CHUNK and name_digests_done(self) and self.times > 0:
            self.times -= 1
            out[100] ^= 0x10
        return out


def name_digests_done(server) -> bool:
    return server.target in server._digests


def test_a_flipped_bit_in_a_chunk_is_detected_and_fetched_again(folder, reference):
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    server = _server(folder, cls=_FlippingServer)
    listener = TcpTransport().listen(("127.0.0.1", 0))
    served = _serve_all(server, listener, 1)
    stats = FetchStats()
    got = fetch_tensors(TcpTransport().connect(listener.address), names, stats=stats)
    served.result()
    listener.close()
    _identical(got, reference, names)
    assert stats.chunks_refetched == 1
    assert stats.requested_chunks.count(("model.embed_tokens.weight", 1)) == 2


def test_a_chunk_that_keeps_failing_fails_the_transfer_in_one_line(folder, reference):
    server = _server(folder, cls=_FlippingServer)
    server.times = 10
    listener = TcpTransport().listen(("127.0.0.1", 0))
    served = _serve_all(server, listener, 1)
    with pytest.raises(BridgeError, match=r"chunk 1 of 'model.embed_tokens.weight' failed its sha256 check 3 times"):
        fetch_tensors(TcpTransport().connect(listener.address), ["model.embed_tokens.weight"])
    served.result()
    listener.close()


def test_an_unknown_name_is_refused_and_the_connection_carries_on(folder, reference):
    server = _server(folder, names=["model.norm.weight"])
    listener = TcpTransport().listen(("127.0.0.1", 0))
    served = _serve_all(server, listener, 1)
    conn = TcpTransport().connect(listener.address)
    with pytest.raises(BridgeError, match="no tensor 'model.embed_tokens.weight' on this node"):
        fetch_tensors(conn, ["model.embed_tokens.weight"], close=False)
    got = fetch_tensors(conn, ["model.norm.weight"])
    served.result()
    listener.close()
    _identical(got, reference, ["model.norm.weight"])
    assert server.stats.errors == 1


def _raw_request(server, frame_parts) -> tuple[BridgeServer, LinkError | None, int]:
    """Send raw bytes to ``server`` over a socket pair; (server, what serve raised, bytes it read)."""
    from vramancer.link.transport import StreamConnection

    a, b = socket.socketpair()
    conn = StreamConnection(b, None, "tcp")
    done = in_thread(lambda: server.serve(conn))
    for part in frame_parts:
        a.sendall(part)
    error = None
    try:
        done.result(20)
    except LinkError as e:
        error = e
    a.close()
    return server, error, conn.bytes_received


def test_a_huge_request_is_refused_before_allocating(folder):
    server = _server(folder)
    huge = 512 << 20
    head = FrameWriter().header(FrameType.TENSORS, [TensorDesc(2, (huge,), huge)], 0x42524447)
    _, error, read = _raw_request(server, [head])          # the 512 MiB never follows
    assert isinstance(error, FrameError) and "limit" in str(error)
    assert read == len(head)                                # header and descriptor only: nothing allocated


def test_malformed_requests_are_refused(folder):
    import json

    def message(obj):
        blob = json.dumps(obj).encode()
        return FrameWriter().header(FrameType.TENSORS, [TensorDesc(2, (len(blob),), len(blob))], 0x42524447) + blob

    for bad, reason in [({"op": "get", "name": "model.norm.weight", "chunks": [[0, 10 ** 9]]}, "chunk ranges"),
                        ({"op": "get", "name": "nope", "chunks": [[0, 1]]}, "unknown tensor"),
                        ({"op": "index", "names": "model.norm.weight"}, "list of at most"),
                        ({"op": "get", "name": "model.embed_tokens.weight", "chunks": [[0, 2], [0, 2]]},
                         "more than the tensor's"),
                        ({"op": "launch"}, "unknown op")]:
        _, error, _ = _raw_request(_server(folder), [message(bad)])
        assert isinstance(error, BridgeError) and reason in str(error), (bad, error)
    _, error, _ = _raw_request(_server(folder), [FrameWriter().header(FrameType.TENSORS, [TensorDesc(2, (3,), 3)],
                                                                      0x42524447) + b"{{{"])
    assert isinstance(error, BridgeError) and "not JSON" in str(error)


def test_a_hostile_index_reply_is_refused_before_allocating(tmp_path):
    """A server announcing a tensor of 2**50 bytes: the client refuses it and allocates nothing."""
    import json

    from vramancer.link.bridge import content_id
    from vramancer.link.transport import StreamConnection

    a, b = socket.socketpair()
    fake = StreamConnection(a, None, "tcp")

    def reply():
        fake.recv()
        nbytes = 1 << 50
        digests = bytes(32 * (nbytes // (64 << 20)))[:32 * 1000]
        entry = {"name": "w", "dtype": "U8", "shape": [nbytes], "nbytes": nbytes,
                 "id": content_id(64 << 20, nbytes, digests)}
        blob = np.frombuffer(json.dumps({"op": "index", "hash": "sha256", "chunk_bytes": 64 << 20,
                                         "tensors": [entry]}).encode(), dtype=np.uint8)
        fake.send([blob, np.frombuffer(digests, dtype=np.uint8)], stream_id=0x42524447)

    t = in_thread(reply)
    with pytest.raises(BridgeError, match="over the limit"):
        fetch_tensors(StreamConnection(b, None, "tcp"), ["w"])
    t.result()
    fake.close()


def test_the_second_fetch_reads_the_cache_and_no_chunk_from_the_network(folder, reference, tmp_path):
    names = sorted(n for n in reference if ".layers.1." in n)
    distinct = _distinct(reference, names)
    assert len(distinct) < len(names)                        # its two norms are both all ones: moved once
    server = _server(folder)
    listener = TcpTransport().listen(("127.0.0.1", 0))
    served = _serve_all(server, listener, 2)
    first = FetchStats()
    fetch_tensors(TcpTransport().connect(listener.address), names, cache_dir=tmp_path, stats=first)
    assert first.chunks_from_network == _chunks(reference, distinct) and first.chunks_from_cache == 0
    sent_before = server.stats.chunk_bytes_sent
    second = FetchStats()
    conn = TcpTransport().connect(listener.address)
    got = fetch_tensors(conn, names, cache_dir=tmp_path, stats=second)
    served.result()
    listener.close()
    _identical(got, reference, names)
    assert second.chunk_bytes_from_network == 0 and server.stats.chunk_bytes_sent == sent_before
    assert second.chunks_from_cache == _chunks(reference, distinct)
    assert conn.bytes_received < 4096                        # the index reply only
    # a damaged cache file is caught by its digests and that chunk alone fetched again
    victim = next(tmp_path.glob("*.bin"))
    data = bytearray(victim.read_bytes())
    data[5] ^= 1
    victim.write_bytes(bytes(data))
    listener = TcpTransport().listen(("127.0.0.1", 0))
    served = _serve_all(server, listener, 1)
    third = FetchStats()
    got = fetch_tensors(TcpTransport().connect(listener.address), names, cache_dir=tmp_path, stats=third)
    served.result()
    listener.close()
    _identical(got, reference, names)
    assert third.chunks_from_network == 1 and third.chunks_from_cache == _chunks(reference, distinct) - 1


@pytest.mark.gpu
def test_a_stage_lands_on_the_gpu_through_one_pinned_chunk(folder, reference):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    names = sorted(reference)
    server = _server(folder)
    listener = TcpTransport().listen(("127.0.0.1", 0))
    served = _serve_all(server, listener, 1)
    got = fetch_tensors(TcpTransport().connect(listener.address), names, device="cuda:0")
    served.result()
    listener.close()
    assert all(t.device.type == "cuda" for t in got.values())
    _identical({n: t.cpu() for n, t in got.items()}, reference, names)


def test_one_server_serves_two_workers_at_once(folder, reference):
    names = sorted(reference)
    distinct = _distinct(reference, names)
    server = _server(folder)
    listener = TcpTransport().listen(("127.0.0.1", 0))
    conns = [TcpTransport().connect(listener.address) for _ in range(2)]
    accepted = [listener.accept(30) for _ in range(2)]
    serving = [in_thread(server.serve, c) for c in accepted]
    fetching = [in_thread(fetch_tensors, c, names) for c in conns]
    results = [f.result() for f in fetching]
    for s in serving:
        s.result()
    listener.close()
    for got in results:
        _identical(got, reference, names)
    assert server.stats.chunk_bytes_sent == 2 * sum(_nbytes(reference[n]) for n in distinct)
    assert server.stats.requests == 2 * (1 + len(distinct) + 1)          # index, one get per tensor, bye
