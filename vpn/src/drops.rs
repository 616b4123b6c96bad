//! Drop counters: each daemon's reasons are one enum with an `ALL` list, and a counters
//! struct with one field per reason (named as the reason, which is how status and the
//! `vpn_drops` metric name it). Status and metrics walk `ALL`, never a JSON object.

/// Declares a reason enum (`ALL`, `name`) and its counters (`count`, `get`, `iter`);
/// counters missing from older JSON read as 0.
macro_rules! drop_reasons {
    (
        $(#[$reason_meta:meta])* $reason:ident;
        $(#[$counters_meta:meta])* $counters:ident {
            $( $(#[$doc:meta])* $variant:ident => $field:ident, )*
        }
    ) => {
        $(#[$reason_meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $reason {
            $( $(#[$doc])* $variant, )*
        }

        impl $reason {
            pub const ALL: &'static [$reason] = &[$($reason::$variant),*];

            /// The counter's name in status and the `reason` label of `vpn_drops`.
            pub fn name(self) -> &'static str {
                match self {
                    $($reason::$variant => stringify!($field),)*
                }
            }
        }

        $(#[$counters_meta])*
        #[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
        pub struct $counters {
            $( $(#[$doc])* #[serde(default)] pub $field: u64, )*
        }

        impl $counters {
            pub fn count(&mut self, why: $reason) {
                match why {
                    $($reason::$variant => self.$field += 1,)*
                }
            }

            pub fn get(&self, why: $reason) -> u64 {
                match why {
                    $($reason::$variant => self.$field,)*
                }
            }

            /// Every reason's name and count, in `ALL`'s order.
            pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
                $reason::ALL.iter().map(|&r| (r.name(), self.get(r)))
            }
        }
    };
}

pub(crate) use drop_reasons;

#[cfg(test)]
mod tests {
    use crate::hub::{HubDropReason, HubDrops};
    use crate::mesh::{MeshDropReason, MeshDrops};
    use crate::peer::{PeerDropCounts, PeerDropReason, PeerDrops};

    /// Status JSON keeps its shape (a peer's own counters flat, the mesh's inside
    /// `mesh`), every reason is a key of it, and the metrics' list names the mesh's as
    /// `mesh_<reason>`.
    #[test]
    fn every_reason_is_counted_shown_and_listed() {
        let mut hub = HubDrops::default();
        for &r in HubDropReason::ALL {
            hub.count(r);
        }
        let json = serde_json::to_value(&hub).expect("serializes");
        for &r in HubDropReason::ALL {
            assert_eq!(json[r.name()], 1, "{}", r.name());
        }
        let mut peer = PeerDropCounts { own: PeerDrops::default(), mesh: Some(MeshDrops::default()) };
        peer.own.count(PeerDropReason::HubLost);
        peer.mesh.as_mut().expect("a mesh").count(MeshDropReason::NoPath);
        let json = serde_json::to_value(&peer).expect("serializes");
        assert_eq!((json["hub_lost"].as_u64(), json["mesh"]["no_path"].as_u64()), (Some(1), Some(1)));
        let listed: Vec<(String, u64)> = peer.iter().collect();
        assert_eq!(listed.len(), PeerDropReason::ALL.len() + MeshDropReason::ALL.len());
        assert!(listed.contains(&("hub_lost".into(), 1)) && listed.contains(&("mesh_no_path".into(), 1)));
        let back: PeerDropCounts = serde_json::from_value(json).expect("reads back");
        assert_eq!(back, peer);
    }
}
