//! Property tests of what ssp-net parses from others: credential bundles and tokens
//! (files people pass around), certificates (from the peer in a handshake), and the
//! forwarded-caller header. Nothing panics; what is accepted is what was meant.
//!
//! Bounded: a fixed number of cases and a fixed seed, no failure files.

use std::sync::OnceLock;
use std::time::Duration;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use ssp_model::CertRole;
use ssp_net::{Bundle, Ca, Identity};

fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(0x5350_0003),
        max_shrink_iters: 1024,
        ..Config::default()
    }
}

/// One valid bundle (key generation is slow: made once).
fn sample() -> &'static (Bundle, String) {
    static S: OnceLock<(Bundle, String)> = OnceLock::new();
    S.get_or_init(|| {
        let ca = Ca::generate("props").unwrap();
        let i = ca
            .issue("alice", CertRole::User, false, Duration::from_secs(3600))
            .unwrap();
        let b = Bundle {
            coordinators: vec!["http://127.0.0.1:7400".into()],
            cert_pem: i.cert_pem,
            key_pem: i.key_pem,
            ca_pem: ca.cert_pem,
        };
        let text = b.render();
        (b, text)
    })
}

proptest! {
    #![proptest_config(config(300))]

    #[test]
    fn arbitrary_text_is_never_a_bundle_and_never_panics(s in ".{0,2000}") {
        prop_assert!(Bundle::parse(&s).is_err());
    }

    #[test]
    fn an_edited_bundle_is_refused_or_is_the_same_holder(
        edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)
    ) {
        let (good, text) = sample();
        let mut bytes = text.clone().into_bytes();
        for (at, b) in edits {
            let i = at.index(bytes.len());
            bytes[i] = b;
        }
        let edited = String::from_utf8_lossy(&bytes);
        if let Ok(b) = Bundle::parse(&edited) {
            // An edit in a comment or in base64 padding may leave the bundle
            // usable; it must still be the same holder and key.
            prop_assert_eq!(b.identity().unwrap(), good.identity().unwrap());
        }
    }

    #[test]
    fn arbitrary_bytes_are_no_certificate(bytes in vec(any::<u8>(), 0..3000)) {
        let _ = Identity::from_der(&bytes);
    }

    #[test]
    fn a_corrupted_certificate_never_panics(
        edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)
    ) {
        let (good, _) = sample();
        let der = rustls_der(&good.cert_pem);
        let mut bytes = der.clone();
        for (at, b) in edits {
            let i = at.index(bytes.len());
            bytes[i] = b;
        }
        let _ = Identity::from_der(&bytes);
    }

    #[test]
    fn the_forwarded_caller_header_round_trips_and_garbage_is_refused(
        name in "[ -~]{1,64}",
        serial in "[0-9a-f]{1,32}",
        role in 0usize..4,
        token in any::<bool>(),
        not_after in any::<i64>(),
        junk in ".{0,200}",
    ) {
        let id = Identity {
            name,
            role: CertRole::ALL[role],
            token,
            serial,
            not_before: 0,
            not_after,
        };
        prop_assert_eq!(ssp_net::auth::decode(&ssp_net::auth::encode(&id)), Some(id));
        let _ = ssp_net::auth::decode(&junk);
    }
}

fn rustls_der(pem: &str) -> Vec<u8> {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64_decode(&body)
}

/// A small base64 decoder, so the test needs no extra crate.
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes() {
        let Some(v) = val(c) else { continue };
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}
