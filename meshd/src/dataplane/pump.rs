//! [`Pump`]: one host's data path driven synchronously, with the time passed in.

use std::io;
use std::sync::Arc;

use meshd_tunnel::Device;

use super::clock::Now;
use super::edge::{Bind, Edges};
use super::rx::rx_and_answer;
use super::timers::Timers;
use super::tx::TxPass;
use super::{lock, Enforcement, IoStats, Shared};

/// One host's packet path without threads: each call runs, once, the code a worker runs
/// ([`tx_pass`](Self::tx_pass): the tx thread's pass over the TUN; [`rx_pass`](Self::rx_pass):
/// the rx thread's pass over the sockets, with the tx pass for the answers it produced;
/// [`timers`](Self::timers): the timer thread's tick), at the `now` it is given. A test
/// harness holds any number of pumps over [`Fake`](super::Fake) edges on one
/// [`FakeNet`](super::FakeNet) and calls them in turn in one thread; nothing waits, nothing
/// reads the clock (the firewall and the activity stamps see `now`; boringtun's session
/// timers read their own clock).
///
/// ```
/// use std::sync::Arc;
/// use meshd::dataplane::{Enforcement, Fake, FakeNet, Now, Pump};
/// use meshd_tunnel::{Device, PrivateKey};
///
/// let net = FakeNet::new();
/// let host = net.host("198.18.0.1:51820".parse().unwrap(), false);
/// let device = Arc::new(Device::new(PrivateKey::generate(), 1));
/// let mut pump = Pump::<Fake>::new(device, Arc::new(Enforcement::new()), host.edges(), 1420).unwrap();
/// let now = Now { micros: 0, unix_ms: 1_800_000_000_000 };
/// pump.timers(now); // start-up handshakes (no peers here: nothing)
/// assert_eq!(pump.tx_pass(now).unwrap(), 0);
/// assert_eq!(pump.rx_pass(now), 0);
/// assert!(net.wire().is_empty());
/// ```
pub struct Pump<E: Edges> {
    shared: Shared<E>,
    timers: Timers,
    ready: <E::Bind as Bind>::Ready,
}

impl<E: Edges> Pump<E> {
    /// A host's packet path over `edges` (TUN queue, bind, poller) with TUN MTU `mtu`.
    pub fn new(
        device: Arc<Device>,
        policy: Arc<Enforcement>,
        edges: (E::Tun, E::Bind, E::Poller),
        mtu: u16,
    ) -> io::Result<Pump<E>> {
        Ok(Pump {
            shared: Shared::new(device, policy, edges, mtu, std::time::Duration::ZERO)?,
            timers: Timers::new(),
            ready: Default::default(),
        })
    }

    /// One tx pass: reads what the TUN holds (bounded, as the tx thread does), seals and
    /// sends it. Returns how many packets were read.
    pub fn tx_pass(&mut self, now: Now) -> io::Result<usize> {
        let mut tx = lock(&self.shared.tx);
        match tx.run(&self.shared, &now) {
            TxPass::Empty => Ok(0),
            TxPass::Sent(n, _) => Ok(n),
            TxPass::Failed(e) => Err(e),
        }
    }

    /// One rx pass: receives what the sockets hold (bounded), opens it, writes it to the
    /// TUN, then (as the rx thread does while the tx thread sleeps) runs a tx pass for the
    /// answers. Returns how many packets went to the TUN.
    pub fn rx_pass(&mut self, now: Now) -> usize {
        let mut rx = lock(&self.shared.rx);
        rx_and_answer(&self.shared, &mut rx, &mut self.ready, &now).delivered
    }

    /// One timer tick (the timer thread's, every 100 ms): the first sends a handshake to
    /// every known endpoint; later ones run the WireGuard timers and the once-a-second work.
    pub fn timers(&mut self, now: Now) {
        self.timers.run(&self.shared, now);
    }

    /// The IO counters.
    pub fn stats(&self) -> &IoStats {
        &self.shared.stats
    }
}
