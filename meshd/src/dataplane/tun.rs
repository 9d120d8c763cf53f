//! Opening the TUN device, with virtio-net offload (TSO reads, GRO writes) where the kernel has it.

use std::io;
use std::net::IpAddr;

use ipnet::IpNet;
use tun_rs::{DeviceBuilder, SyncDevice};

/// An open TUN device and whether it runs with offload.
pub struct Tun {
    /// The device (non-blocking).
    pub dev: SyncDevice,
    /// Offload (virtio-net header) is on: reads may be TSO super-packets, writes are coalesced.
    pub offload: bool,
    /// Kernel interface index.
    pub index: u32,
}

/// Creates and addresses the TUN device `name`. Errors say what the operator can do.
pub fn open(name: &str, mtu: u16, addresses: &[IpNet]) -> anyhow::Result<Tun> {
    if !std::path::Path::new("/dev/net/tun").exists() {
        anyhow::bail!("/dev/net/tun does not exist: load the tun module (`modprobe tun`) or, in a container, pass the device in");
    }
    let build = |offload: bool| -> io::Result<SyncDevice> {
        let mut b = DeviceBuilder::new()
            .name(name)
            .mtu(mtu)
            .tx_queue_len(5000)
            .offload(offload)
            .enable(true);
        let mut v4_done = false;
        for a in addresses {
            match a.addr() {
                IpAddr::V4(v4) if !v4_done => {
                    b = b.ipv4(v4, a.prefix_len(), None);
                    v4_done = true;
                }
                IpAddr::V6(v6) => b = b.ipv6(v6, a.prefix_len()),
                IpAddr::V4(_) => {}
            }
        }
        b.build_sync()
    };
    let (dev, offload) = match build(true) {
        Ok(d) => (d, true),
        Err(e)
            if e.kind() == io::ErrorKind::PermissionDenied
                || e.raw_os_error() == Some(libc::EPERM) =>
        {
            return Err(not_permitted(name));
        }
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            anyhow::bail!("interface {name} is already in use (another meshd running?)");
        }
        Err(first) => match build(false) {
            Ok(d) => {
                tracing::warn!(error = %first, "TUN offload unavailable; running without it");
                (d, false)
            }
            Err(e) => return Err(anyhow::anyhow!(e).context(format!("creating TUN device {name}"))),
        },
    };
    dev.set_nonblocking(true)?;
    let index = dev.if_index()?;
    let offload = offload && dev.tcp_gso();
    Ok(Tun {
        dev,
        offload,
        index,
    })
}

fn not_permitted(name: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "creating TUN device {name}: operation not permitted. meshd needs root or CAP_NET_ADMIN \
         (run with sudo, or `setcap cap_net_admin+ep $(which meshd)`)"
    )
}
