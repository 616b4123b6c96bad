//! Names in the VPN: `<peer>.<domain>` answers A (its VPN address) and AAAA (its IPv6
//! mapping), sans-IO. The wire format is hickory-proto's.
//!
//! The hub answers on its VPN address, port 53, so only what comes through the VPN (from
//! registered peers, or the hub host itself) reaches it. Rules: a question under
//! `domain` for a listed peer is answered (authoritatively, TTL `DNS_TTL`); another type
//! for that name gets an empty answer; an unknown name under `domain` is NXDOMAIN;
//! anything else is REFUSED (this is no recursive resolver). Answers are never larger
//! than `MAX_DNS_ANSWER` bytes, and what does not parse as one query is dropped.

use crate::ip;
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use std::net::Ipv4Addr;

/// Peer addresses change when peers come back; resolvers should not keep them long.
pub const DNS_TTL: u32 = 5;
/// Plain DNS over UDP: an answer fits 512 bytes.
pub const MAX_DNS_ANSWER: usize = 512;

/// Whether `domain` is a usable DNS domain for the VPN (labels of letters, digits and
/// `-`, not starting or ending with `-`, at most 63 bytes each, 253 in all).
pub fn valid_domain(domain: &str) -> bool {
    !domain.is_empty()
        && domain.len() <= 253
        && domain.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// Whether a peer lets `domain` (as a hub names it) route this host's name lookups to the
/// hub: a valid DNS name that is not a public suffix (`com`, `co.uk`, `github.io`, ...),
/// so a hostile hub cannot take over a top-level domain's lookups.
pub fn acceptable_vpn_domain(domain: &str) -> bool {
    let d = domain.trim_end_matches('.').to_ascii_lowercase();
    valid_domain(&d) && !psl::suffix(d.as_bytes()).is_some_and(|s| s.is_known() && s.as_bytes().len() == d.len())
}

/// The answer to the DNS query `query` for names under `domain`, `lookup` giving a
/// peer's address by (lower-case) name; `None` when the datagram is not a query to
/// answer.
pub fn answer(query: &[u8], domain: &str, lookup: impl Fn(&str) -> Option<Ipv4Addr>) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    if q.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut r = Message::response(q.metadata.id, q.metadata.op_code);
    r.metadata.recursion_desired = q.metadata.recursion_desired;
    if q.metadata.op_code != OpCode::Query || q.queries.len() != 1 {
        r.metadata.response_code = ResponseCode::NotImp;
        return r.to_vec().ok();
    }
    let question = q.queries[0].clone();
    let name = question.name().to_ascii().trim_end_matches('.').to_ascii_lowercase();
    let domain = domain.to_ascii_lowercase();
    r.add_query(question.clone());
    let under = name.strip_suffix(&domain).and_then(|rest| rest.strip_suffix('.'));
    match under {
        None if name == domain => r.metadata.authoritative = true,
        None => r.metadata.response_code = ResponseCode::Refused,
        Some(label) => {
            r.metadata.authoritative = true;
            match lookup(label) {
                None => r.metadata.response_code = ResponseCode::NXDomain,
                Some(addr) => {
                    let owner = question.name().clone();
                    match question.query_type() {
                        RecordType::A => {
                            r.add_answer(Record::from_rdata(owner, DNS_TTL, RData::A(A(addr))));
                        }
                        RecordType::AAAA => {
                            r.add_answer(Record::from_rdata(owner, DNS_TTL, RData::AAAA(AAAA(ip::v6_of(addr)))));
                        }
                        _ => {} // the name exists; no data of that type
                    }
                }
            }
        }
    }
    r.to_vec().ok().filter(|b| b.len() <= MAX_DNS_ANSWER)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;
    use std::str::FromStr;

    fn ask(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_str(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    fn lookup(n: &str) -> Option<Ipv4Addr> {
        (n == "beta").then_some(Ipv4Addr::new(10, 99, 0, 3))
    }

    fn reply(q: &[u8]) -> Message {
        Message::from_vec(&answer(q, "mpvpn", lookup).expect("an answer")).unwrap()
    }

    #[test]
    fn peers_by_name() {
        let r = reply(&ask("beta.mpvpn.", RecordType::A));
        assert_eq!(
            (r.metadata.id, r.metadata.response_code, r.metadata.authoritative),
            (0x1234, ResponseCode::NoError, true)
        );
        assert_eq!(r.answers.len(), 1);
        assert_eq!(r.answers[0].data, RData::A(A(Ipv4Addr::new(10, 99, 0, 3))));
        assert_eq!(r.answers[0].ttl, DNS_TTL);
        let r = reply(&ask("BETA.mpvpn", RecordType::AAAA));
        assert_eq!(r.answers[0].data, RData::AAAA(AAAA("fd6d:7074::a63:3".parse().unwrap())));
        let r = reply(&ask("beta.mpvpn.", RecordType::MX));
        assert_eq!((r.metadata.response_code, r.answers.len()), (ResponseCode::NoError, 0));
    }

    #[test]
    fn unknown_names_and_other_domains() {
        assert_eq!(reply(&ask("gamma.mpvpn.", RecordType::A)).metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(reply(&ask("mpvpn.", RecordType::A)).metadata.response_code, ResponseCode::NoError);
        assert_eq!(reply(&ask("example.com.", RecordType::A)).metadata.response_code, ResponseCode::Refused);
        assert_eq!(reply(&ask("beta.mpvpn.example.", RecordType::A)).metadata.response_code, ResponseCode::Refused);
        assert_eq!(reply(&ask("xmpvpn.", RecordType::A)).metadata.response_code, ResponseCode::Refused);
    }

    #[test]
    fn garbage_and_answers_are_not_answered() {
        assert!(answer(&[1, 2, 3], "mpvpn", lookup).is_none());
        let back = answer(&ask("beta.mpvpn.", RecordType::A), "mpvpn", lookup).unwrap();
        assert!(answer(&back, "mpvpn", lookup).is_none(), "a response is never answered (no loops)");
        let mut rng = common::sim::SimRng::new(4);
        for len in 0..300 {
            let d: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            if let Some(a) = answer(&d, "mpvpn", lookup) {
                assert!(a.len() <= MAX_DNS_ANSWER);
            }
        }
    }

    #[test]
    fn domains() {
        assert!(valid_domain("mpvpn") && valid_domain("vpn.example.org") && valid_domain("a-b"));
        assert!(!valid_domain("") && !valid_domain("-x") && !valid_domain("a..b") && !valid_domain("a_b"));
    }
}
