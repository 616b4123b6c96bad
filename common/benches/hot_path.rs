//! Hot-path costs per packet, beside the raw ring AEAD measured in the same run.
//!
//! `cargo bench -p common --bench hot_path` runs the criterion benchmarks, then prints a
//! summary: ns per 1400-byte packet for each piece and the overhead of our code as a
//! ratio of the AEAD's own cost (target: < 0.5).

use common::crypto::Cipher;
use common::replay::{ReplayVerdict, ReplayWindow};
use common::server::ServerRecv;
use common::sim::{LinkDir, Sim};
use common::wire::{
    emit_transport_header, InnerRepr, ProbeRepr, TransportPacket, DATA_PAYLOAD_OFFSET, HANDSHAKE_RESP_LEN,
    MAX_DATAGRAM, TRANSPORT_HEADER_LEN,
};
use common::SessionId;
use criterion::{black_box, Criterion};
use ring::aead;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const PAYLOAD: usize = 1400;

fn ring_key(alg: &'static aead::Algorithm) -> aead::LessSafeKey {
    aead::LessSafeKey::new(aead::UnboundKey::new(alg, &[7u8; 32]).expect("key"))
}

/// Raw ring: seal then open one 1400-byte buffer (the floor for our seal + open).
fn raw_aead_round(key: &aead::LessSafeKey, seq: u64, buf: &mut [u8; PAYLOAD + 16]) {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&seq.to_be_bytes());
    let tag = key
        .seal_in_place_separate_tag(
            aead::Nonce::assume_unique_for_key(n),
            aead::Aad::from(&[0u8; 17]),
            &mut buf[..PAYLOAD],
        )
        .expect("seal");
    buf[PAYLOAD..].copy_from_slice(tag.as_ref());
    key.open_in_place(aead::Nonce::assume_unique_for_key(n), aead::Aad::from(&[0u8; 17]), &mut buf[..]).expect("open");
}

/// A client and server core with an established session, datagrams passed by hand.
struct Pair {
    sim: Sim,
    app: SocketAddr,
    from: SocketAddr,
    buf: Vec<u8>,
    out: [u8; HANDSHAKE_RESP_LEN],
}

impl Pair {
    fn new(cipher: Cipher) -> Self {
        let dir = LinkDir::lossy(0.0, 1);
        let mut sim = Sim::new(1, vec![(dir, dir); 3], cipher);
        let app: SocketAddr = "127.0.0.1:5000".parse().expect("literal");
        sim.app_send(app, b"hello");
        sim.run_for(Duration::from_millis(200));
        assert_eq!(sim.app_received.len(), 1, "session established");
        Self {
            sim,
            app,
            from: "10.0.0.1:40000".parse().expect("literal"),
            buf: vec![0; MAX_DATAGRAM],
            out: [0; HANDSHAKE_RESP_LEN],
        }
    }

    /// One application datagram through the client core (seal) and the server core
    /// (replay check, open, mark, forward): the whole datagram path minus syscalls.
    fn client_to_server(&mut self) {
        let now = self.sim.now;
        self.buf[DATA_PAYLOAD_OFFSET..DATA_PAYLOAD_OFFSET + PAYLOAD].fill(0x5a);
        let common::client::ClientSend::Sealed { len, .. } =
            self.sim.client.handle_app_datagram(now, self.app, &mut self.buf, PAYLOAD)
        else {
            panic!("not established")
        };
        let r = self.sim.server.handle_datagram(now, self.from, &mut self.buf[..len], &mut self.out);
        assert!(matches!(r, ServerRecv::Forward { .. }));
    }
}

fn benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("aead_raw_ring_1400B");
    for (name, alg) in [("aes256gcm", &aead::AES_256_GCM), ("chacha20poly1305", &aead::CHACHA20_POLY1305)] {
        let key = ring_key(alg);
        let mut buf = [0u8; PAYLOAD + 16];
        let mut seq = 0u64;
        g.bench_function(name, |b| {
            b.iter(|| {
                seq += 1;
                raw_aead_round(&key, seq, &mut buf);
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("datagram_path_1400B");
    for (name, cipher) in [("aes256gcm", Cipher::Aes256Gcm), ("chacha20poly1305", Cipher::ChaCha20Poly1305)] {
        let mut pair = Pair::new(cipher);
        g.bench_function(name, |b| b.iter(|| pair.client_to_server()));
    }
    g.finish();

    c.bench_function("replay_window_check_mark", |b| {
        let mut w = ReplayWindow::new();
        let mut seq = 0u64;
        b.iter(|| {
            seq += 1;
            if w.check(black_box(seq)) == ReplayVerdict::Fresh {
                w.mark(seq);
            }
        })
    });

    c.bench_function("wire_transport_header_emit_parse", |b| {
        let mut buf = [0u8; 64];
        let mut seq = 0u64;
        b.iter(|| {
            seq += 1;
            emit_transport_header(&mut buf, SessionId(42), seq);
            let p = TransportPacket::new_checked(black_box(&buf[..])).expect("valid");
            black_box((p.session_id(), p.seq()))
        })
    });

    c.bench_function("wire_probe_emit_parse", |b| {
        let mut buf = [0u8; 64];
        let probe = InnerRepr::Probe(ProbeRepr {
            path_id: 1,
            flags: 0,
            probe_seq: 9,
            tx_time_us: 7,
            echo_challenge: 3,
            down_loss_ppm: None,
            rtt_us: None,
        });
        b.iter(|| {
            let n = probe.emit(&mut buf[TRANSPORT_HEADER_LEN..]).expect("fits");
            let parsed = InnerRepr::parse(&buf[TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + n]).expect("valid");
            black_box(matches!(parsed, InnerRepr::Probe(_)))
        })
    });
}

/// Median ns per call of `f` over 7 runs of `n` calls.
fn median_ns(n: u32, mut f: impl FnMut()) -> f64 {
    let mut runs: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..n {
                f();
            }
            t.elapsed().as_nanos() as f64 / f64::from(n)
        })
        .collect();
    runs.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    runs[3]
}

/// Median ns of one raw ring seal+open of a 1400-byte buffer.
fn aead_round_ns(alg: &'static aead::Algorithm) -> f64 {
    let key = ring_key(alg);
    let mut buf = [0u8; PAYLOAD + 16];
    let mut seq = 0u64;
    median_ns(100_000, || {
        seq += 1;
        raw_aead_round(&key, seq, &mut buf);
    })
}

fn summary() {
    println!("\nsummary: ns per 1400-byte datagram (median of 7 runs, same process)");
    println!(
        "{:<20} {:>14} {:>18} {:>16} {:>10}",
        "cipher", "ring seal+open", "client+server core", "our code only", "ratio"
    );
    for (name, alg, cipher) in [
        ("aes-256-gcm", &aead::AES_256_GCM, Cipher::Aes256Gcm),
        ("chacha20-poly1305", &aead::CHACHA20_POLY1305, Cipher::ChaCha20Poly1305),
    ] {
        let aead_ns = aead_round_ns(alg);
        let mut pair = Pair::new(cipher);
        let path_ns = median_ns(100_000, || pair.client_to_server());
        let ours = (path_ns - aead_ns).max(0.0);
        println!("{:<20} {:>14.1} {:>18.1} {:>16.1} {:>10.2}", name, aead_ns, path_ns, ours, ours / aead_ns);
    }
    println!("(ratio = our code's cost per datagram excluding AEAD and syscalls / the AEAD's; target < 0.5)");
}

/// Reed–Solomon 10+4 over 1400-byte datagrams (`common::fec`): encoding a group and
/// rebuilding 4 lost datagrams, per data datagram, against one AES-256-GCM seal+open in
/// the same process.
fn fec_summary() {
    use common::fec::{FecDecoder, FecEncoder, MAX_SHARD};
    let (k, r) = (10usize, 4usize);
    let data: Vec<Vec<u8>> = (0..k).map(|i| vec![i as u8; PAYLOAD]).collect();
    let mut enc = FecEncoder::new(0);
    let mut parity = vec![0u8; r * MAX_SHARD];
    let encode_ns = median_ns(2_000, || {
        for d in &data {
            black_box(enc.push(d).expect("fits"));
        }
        black_box(enc.close(r, &mut parity).expect("closes"));
    }) / k as f64;
    // groups made beforehand; each round, one group's 4 first datagrams are lost and
    // rebuilt from its 4 parity shards
    // (every group once: 7 runs of ROUNDS groups)
    const ROUNDS: u32 = 64;
    const GROUPS: usize = 7 * ROUNDS as usize;
    let made: Vec<_> = (0..GROUPS)
        .map(|_| {
            let tags: Vec<_> = data.iter().map(|d| enc.push(d).expect("fits")).collect();
            let closed = enc.close(r, &mut parity).expect("closes");
            (tags, closed, parity[..r * usize::from(closed.shard_len)].to_vec())
        })
        .collect();
    let mut dec = FecDecoder::new();
    let mut round = 0usize;
    let decode_ns = median_ns(ROUNDS, || {
        let (tags, closed, shards) = &made[round];
        let len = usize::from(closed.shard_len);
        for (t, d) in tags.iter().zip(&data).skip(r) {
            dec.handle_data(*t, d, |x| {
                black_box(x);
            });
        }
        for i in 0..r {
            dec.handle_parity(closed.header(i as u8), &shards[i * len..][..len], |x| {
                black_box(x);
            });
        }
        round += 1;
    }) / k as f64;
    let aead_ns = aead_round_ns(&aead::AES_256_GCM);
    println!("\nfec rs {k}+{r}, ns per 1400-byte data datagram (median of 7 runs, same process):");
    println!(
        "  encode {encode_ns:.1}   receive and rebuild 4 lost {decode_ns:.1}   aes-256-gcm seal+open {aead_ns:.1}"
    );
    println!("  ratios to the AEAD: {:.2} and {:.2}", encode_ns / aead_ns, decode_ns / aead_ns);
}

/// The adaptive policy's review (`redundancy::choose`), which a sending session runs
/// every 50 ms while it sends: its worst case (3 paths at 20%, a rate that fills groups
/// of 16, so four group lengths with up to 16 parity each), against the AEAD cost of
/// the 100 datagrams a 2000/s flow sends between two reviews.
fn policy_summary() {
    use common::redundancy::{choose, PathEstimate, DEFAULT_TARGET_LOSS};
    let paths: Vec<PathEstimate> = (0..3)
        .map(|index| PathEstimate { index, loss: Some(0.2), rtt: None, overdue: false, stalled: false })
        .collect();
    let review_ns = median_ns(200, || {
        black_box(choose(black_box(&paths), DEFAULT_TARGET_LOSS, 16));
    });
    let aead_ns = aead_round_ns(&aead::AES_256_GCM);
    println!(
        "
adaptive review at 20% loss, groups up to 16: {:.1} µs",
        review_ns / 1000.0
    );
    println!("  against the AEAD of 100 datagrams (50 ms at 2000/s): {:.2}", review_ns / (100.0 * aead_ns));
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    benches(&mut c);
    c.final_summary();
    summary();
    fec_summary();
    policy_summary();
}
