//! What the end-to-end tests, the demo and the bench share, one concern per module:
//!
//! - `lab`: network namespaces, veth links, loss rules, processes, teardown;
//! - `traffic`: bounded generators and sinks (UDP echo and streams, TCP, ping);
//! - `tunnel`: the tunnel topology (client, three bridges, server) and `TunnelLab`;
//! - `vpn_lab`: the VPN topology (hub, two peers, three bridges) and `VpnLab`;
//! - `mesh_lab`: the mesh topology (hub on a wan, peers public or behind NATs) and `MeshLab`;
//! - `cluster_lab`: three hubs, each beside an etcd member, and a registrar (`ClusterLab`).

pub mod cluster_lab;
pub mod lab;
pub mod mesh_lab;
pub mod traffic;
pub mod tunnel;
pub mod vpn_lab;

pub use cluster_lab::*;
pub use lab::*;
pub use mesh_lab::*;
pub use traffic::*;
pub use tunnel::*;
pub use vpn_lab::*;
