//! The command line of this program (clap), in the library so that man pages and shell
//! completions are generated from the same definitions.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// One flat private network over lossy links: peers send IP packets from a TUN device
/// through KCP and the multipath tunnel (mpclient -> bridges -> mpserver) to the hub,
/// which keeps the peer registry and routes between peers and its own TUN. With `mesh:`
/// in peer.yaml (and `rendezvous:` in hub.yaml) peers talk to each other directly, the hub
/// helping them through NATs and relaying only when that fails.
/// SIGTERM or SIGINT stops a hub or peer cleanly (final stats line, control socket removed).
#[derive(Parser)]
#[command(name = "mpvpn", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the hub (beside mpserver, whose target is the hub's `listen`); or, with
    /// `add-peer`, add a peer to its hub.yaml.
    ///
    /// With `cluster:` in hub.yaml the hub is one of several: through etcd they give each
    /// peer name one address cluster-wide and elect a master (`mpvpn status` shows it;
    /// `on_master` runs on a change); see the README's "Several hubs".
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Hub {
        #[command(subcommand)]
        action: Option<HubAction>,
        /// hub.yaml (see conf/hub.yaml, and conf/hub-cluster.yaml for several hubs).
        #[arg(short, long, required = true)]
        config: Option<PathBuf>,
        /// Control socket for `mpvpn status` [default: the config's control_socket, else
        /// /run/mptunnel/mpvpn-<config file name>.sock].
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
        /// Where the hub keeps the addresses it gave out, across restarts [default: the
        /// config's state_file, else <config without .yaml>.state.json beside it].
        #[arg(long, value_name = "PATH")]
        state_file: Option<PathBuf>,
    },
    /// Run a peer (beside mpclient, whose listen address is the peer's `tunnel`); with
    /// `mesh:` in its config, also direct sessions with other peers.
    Peer {
        #[arg(short, long)]
        config: PathBuf,
        /// Control socket for `mpvpn status` [default: the config's control_socket, else
        /// /run/mptunnel/mpvpn-<config file name>.sock].
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
    },
    /// Show the hub's or peer's view: peers, addresses, state, how each is reached (direct
    /// paths or the hub's relay), heartbeats, RTT, bytes; of
    /// the instance NAME (started with `-c .../NAME.yaml`), else the only one running,
    /// else the list of them.
    Status(common::driver::control::StatusRequest),
    /// Print a new peer key, or write it to FILE (mode 600).
    Genkey { file: Option<PathBuf> },
    /// Make the running hub re-read hub.yaml (as SIGHUP does): added peers may join,
    /// removed ones are dropped; a config with an error is refused and the running one
    /// stays (see the hub's log).
    Reload {
        /// The hub's instance: its config file's name without `.yaml`.
        #[arg(value_name = "NAME")]
        instance: Option<String>,
        /// The hub's control socket [default: /run/mptunnel/mpvpn-NAME.sock].
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum HubAction {
    /// Make a key for a new peer, add the peer to hub.yaml (its comments and order kept)
    /// and print the peer.yaml to copy to that host. `mpvpn reload` lets a running hub
    /// take it.
    AddPeer {
        /// The peer's name (letters, digits, `-`, `_`, `.`).
        name: String,
        /// The hub's hub.yaml.
        #[arg(short, long)]
        config: PathBuf,
        /// A fixed VPN address for it [default: one from the pool when it registers].
        #[arg(long, value_name = "ADDR")]
        address: Option<std::net::Ipv4Addr>,
        /// Subnets behind it that it may announce, comma-separated.
        #[arg(long, value_name = "PREFIX,...", value_delimiter = ',')]
        routes: Vec<crate::ip::Prefix>,
    },
}
