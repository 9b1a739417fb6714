//! Which hook the balancer takes on each interface, and attaching it there through a pinned
//! link: adopting the link a previous agent left, or switching it when the hook changed.
//!
//! The rule (`--xdp-mode auto`): native XDP on NICs, TC everywhere else. A veth or a bridge
//! under native or generic XDP loses traffic in ways nothing reports: frames redirected into
//! a veth whose peer has neither GRO nor XDP vanish, local senders' partial checksums leave
//! unfinished, generic XDP cannot redirect the GSO packets bulk TCP is made of, and bridges
//! take no native XDP at all. The TC hook sees socket buffers, which carry all of that.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use futures_util::TryStreamExt as _;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo};
use tracing::{info, warn};

use crate::datapath::{Datapath, Hook, PinnedAttachment, detach_pinned};

/// `--xdp-mode`: the operator's choice of hook, for every interface of the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeChoice {
    /// Per interface: native XDP on NICs (TC if the driver refuses), TC on veths, bridges and
    /// other virtual devices.
    Auto,
    /// Native XDP everywhere (fails where the driver has none).
    Native,
    /// Generic XDP everywhere: slow, and GSO packets cannot be redirected.
    Skb,
    /// TC ingress (tcx) everywhere.
    Tc,
}

/// What kind of device an interface is, as far as the hook choice goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkKind {
    /// No link kind: a device with a driver of its own (a NIC).
    Device,
    Veth,
    Bridge,
    /// Another virtual device (vlan, bond, macvlan, tun, ...), by its kind's name.
    Virtual(String),
}

impl LinkKind {
    fn of(infos: &[LinkInfo]) -> Self {
        infos
            .iter()
            .find_map(|info| match info {
                LinkInfo::Kind(InfoKind::Veth) => Some(Self::Veth),
                LinkInfo::Kind(InfoKind::Bridge) => Some(Self::Bridge),
                LinkInfo::Kind(kind) => Some(Self::Virtual(kind.to_string())),
                _ => None,
            })
            .unwrap_or(Self::Device)
    }
}

/// One interface of the agent's network namespace.
#[derive(Clone, Debug)]
pub struct Link {
    pub name: String,
    pub index: u32,
    pub kind: LinkKind,
    /// The id of the XDP program the interface carries when listed (any mode), if any.
    pub xdp_program: Option<u32>,
}

/// Every interface in the agent's network namespace.
///
/// # Errors
/// Netlink failing.
pub async fn links() -> Result<Vec<Link>> {
    let (connection, handle, _) = rtnetlink::new_connection().context("opening netlink")?;
    let task = tokio::spawn(connection);
    let mut stream = handle.link().get().execute();
    let mut links = Vec::new();
    while let Some(link) = stream.try_next().await.context("listing interfaces")? {
        let mut name = String::new();
        let mut kind = LinkKind::Device;
        let mut xdp_program = None;
        for attr in &link.attributes {
            match attr {
                LinkAttribute::IfName(n) => name.clone_from(n),
                LinkAttribute::LinkInfo(infos) => kind = LinkKind::of(infos),
                LinkAttribute::Xdp(xdp) => {
                    xdp_program = xdp.iter().find_map(|a| match a {
                        rtnetlink::packet_route::link::LinkXdp::ProgId(id) if *id != 0 => Some(*id),
                        _ => None,
                    });
                }
                _ => {}
            }
        }
        links.push(Link {
            name,
            index: link.header.index,
            kind,
            xdp_program,
        });
    }
    task.abort();
    Ok(links)
}

/// Interfaces XDP may redirect frames into. Only NICs under `auto` and `tc`: a veth drops
/// redirected frames unless its peer (in a container, out of the agent's sight) has GRO or
/// XDP on, so traffic towards veths goes through the stack or the TC hook instead. An
/// operator who asked for XDP on every interface (`native`, `skb`) gets every veth too, as
/// before; the start-up warning says what the peers then need.
#[must_use]
pub fn redirect_targets(links: &[Link], choice: ModeChoice) -> Vec<&Link> {
    links
        .iter()
        .filter(|l| l.name != "lo")
        .filter(|l| match l.kind {
            LinkKind::Device => true,
            LinkKind::Veth | LinkKind::Virtual(_) => {
                matches!(choice, ModeChoice::Native | ModeChoice::Skb)
            }
            // A bridge does not transmit XDP frames.
            LinkKind::Bridge => false,
        })
        .collect()
}

/// The hook to try first on an interface, the reason, and the hook to fall back to when
/// the kernel refuses the first.
#[must_use]
pub fn plan(choice: ModeChoice, kind: &LinkKind) -> (Hook, String, Option<Hook>) {
    match (choice, kind) {
        (ModeChoice::Native, _) => (Hook::XdpNative, "--xdp-mode native".into(), None),
        (ModeChoice::Skb, _) => (Hook::XdpGeneric, "--xdp-mode skb".into(), None),
        (ModeChoice::Tc, _) => (Hook::Tc, "--xdp-mode tc".into(), None),
        (ModeChoice::Auto, LinkKind::Device) => (
            Hook::XdpNative,
            "a NIC: native XDP is the fastest hook".into(),
            Some(Hook::Tc),
        ),
        (ModeChoice::Auto, LinkKind::Veth) => (
            Hook::Tc,
            "a veth: TC carries GSO packets and local senders' partial checksums, which XDP \
             on a veth drops or corrupts"
                .into(),
            None,
        ),
        (ModeChoice::Auto, LinkKind::Bridge) => (
            Hook::Tc,
            "a bridge: no native XDP, and generic XDP cannot redirect GSO packets".into(),
            None,
        ),
        (ModeChoice::Auto, LinkKind::Virtual(kind)) => (
            Hook::Tc,
            format!("a {kind} device: TC works on any device and carries GSO packets"),
            None,
        ),
    }
}

/// What goes wrong with `hook` on an interface of `kind`, for the start-up log.
#[must_use]
pub fn hazard(hook: Hook, kind: &LinkKind) -> Option<&'static str> {
    match (hook, kind) {
        (Hook::XdpNative, LinkKind::Veth) => Some(
            "native XDP on a veth: frames redirected into a veth are dropped unless its peer has \
             GRO or an XDP program, and packets from local senders behind it carry partial \
             checksums XDP cannot finish (turn TX checksum offload off there); \
             --xdp-mode auto uses TC on veths",
        ),
        (Hook::XdpGeneric, _) => Some(
            "generic XDP cannot redirect GSO packets larger than the MTU: they are dropped and \
             bulk TCP stalls unless GRO, GSO and TSO are off along the path; --xdp-mode auto or \
             tc avoids this",
        ),
        _ => None,
    }
}

/// Where the link of `hook` on `iface` is pinned. Interface names never hold ':'.
#[must_use]
pub fn pin_path(bpffs: &Path, iface: &str, hook: Hook) -> PathBuf {
    bpffs.join(format!("link_{iface}:{}", hook.name()))
}

/// The interface an attachment pin belongs to (`link_IFACE:HOOK`, or `link_IFACE` as pinned
/// before hooks had names), for `xlb detach`.
#[must_use]
pub fn pinned_iface(file_name: &str) -> Option<&str> {
    let rest = file_name.strip_prefix("link_")?;
    Some(rest.split_once(':').map_or(rest, |(iface, _)| iface))
}

/// Links pinned for `iface` with another hook than `hook` (a previous agent's choice);
/// a pin from before hooks had names stands for XDP.
fn stale_pins(bpffs: &Path, iface: &str, hook: Hook) -> Vec<(PathBuf, Option<Hook>)> {
    let legacy = bpffs.join(format!("link_{iface}"));
    let mut stale: Vec<_> = Hook::ALL
        .into_iter()
        .filter(|h| *h != hook)
        .map(|h| (pin_path(bpffs, iface, h), Some(h)))
        .filter(|(path, _)| path.exists())
        .collect();
    if legacy.exists() {
        stale.push((legacy, None));
    }
    stale
}

/// Attaches the balancer to `link` as `choice` says: adopts the link a previous agent
/// pinned for the same hook (program replaced in place), or moves the interface to the new
/// hook. Moving between XDP modes leaves the interface without a program for the moment
/// between detach and attach (one XDP program per device); moving between XDP and TC does
/// not (the new hook is attached before the old one goes).
///
/// # Errors
/// The kernel refusing every hook the plan allows.
pub fn attach(
    datapath: &mut Datapath,
    link: &Link,
    choice: ModeChoice,
    bpffs: &Path,
) -> Result<PinnedAttachment> {
    let (first, why, fallback) = plan(choice, &link.kind);
    let name = link.name.as_str();
    let attached = match attach_hook(datapath, link, first, bpffs) {
        Ok(attached) => attached,
        Err(e) => {
            let Some(fallback) = fallback else {
                let hint = match (first.is_xdp(), foreign_xdp_program(link)) {
                    (true, Some(other)) => format!(
                        " ({name} already runs the XDP program {other}, which is not xlb's: \
                         remove it with `ip link set dev {name} xdp off`, or attach xlb at TC \
                         with --xdp-mode tc)"
                    ),
                    _ if first == Hook::XdpNative => " (try --xdp-mode auto or tc)".to_owned(),
                    _ => String::new(),
                };
                return Err(e.context(format!("attaching to {name} at {first}{hint}")));
            };
            warn!(
                iface = name,
                "{first} refused ({}): using {fallback} instead",
                crate::agent::error_chain(e.as_ref())
            );
            attach_hook(datapath, link, fallback, bpffs)
                .with_context(|| format!("attaching to {name} at {fallback}"))?
        }
    };
    if attached.adopted {
        info!(iface = name, hook = %attached.hook, "adopted the running data path (program replaced in place)");
    } else {
        info!(iface = name, hook = %attached.hook, why = %why, "attached");
    }
    if let Some(hazard) = hazard(attached.hook, &link.kind) {
        warn!(iface = name, "{hazard}");
    }
    if !attached.hook.is_xdp()
        && let Some(other) = foreign_xdp_program(link)
    {
        warn!(
            iface = name,
            "the XDP program {other} on this interface sees every packet before xlb's TC hook \
             (remove it with `ip link set dev {name} xdp off` if it is not meant to)"
        );
    }
    Ok(attached)
}

/// The XDP program another tool attached to `link` when it was listed, by name and id; an
/// xlb program (a previous agent's, being adopted) is not foreign.
fn foreign_xdp_program(link: &Link) -> Option<String> {
    let id = link.xdp_program?;
    let name = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .and_then(|p| p.name_as_str().map(str::to_owned));
    match name.as_deref() {
        Some(n) if n == lb_common::program_names::XLB => None,
        Some(n) => Some(format!("'{n}' (id {id})")),
        None => Some(format!("with id {id}")),
    }
}

fn attach_hook(
    datapath: &mut Datapath,
    link: &Link,
    hook: Hook,
    bpffs: &Path,
) -> Result<PinnedAttachment> {
    let stale = stale_pins(bpffs, &link.name, hook);
    // One XDP program per device: an XDP link of the other mode (or of unknown mode) must
    // go first. The legacy pin is adopted when XDP is wanted.
    let pin = match stale.iter().find(|(_, h)| h.is_none()) {
        Some((legacy, _)) if hook.is_xdp() => legacy.clone(),
        _ => pin_path(bpffs, &link.name, hook),
    };
    let must_go_first = |h: &Option<Hook>| hook.is_xdp() && h.is_none_or(Hook::is_xdp);
    let retire = |first: bool| -> Result<()> {
        for (path, previous) in stale
            .iter()
            .filter(|(p, h)| *p != pin && must_go_first(h) == first)
        {
            detach_pinned(path)?;
            info!(
                iface = %link.name,
                from = previous.map_or("xdp", Hook::name),
                to = %hook,
                when = if first { "before attaching" } else { "after attaching" },
                "hook changed: detached the previous attachment"
            );
        }
        Ok(())
    };
    retire(true)?;
    let attached = datapath.attach_pinned(link.index, hook, &pin)?;
    retire(false)?;
    Ok(attached)
}

/// Removes the attachments a previous agent pinned for interfaces this one is not told to
/// use (a kept-attached data path must not go on running where nobody manages it); returns
/// those interfaces.
///
/// # Errors
/// A pin that cannot be read or removed.
pub fn detach_unlisted(bpffs: &Path, listed: &[String]) -> Result<Vec<String>> {
    let mut detached = Vec::new();
    for entry in fs::read_dir(bpffs).with_context(|| format!("reading {}", bpffs.display()))? {
        let entry = entry.with_context(|| format!("reading {}", bpffs.display()))?;
        let file_name = entry.file_name().to_string_lossy().into_owned();
        if let Some(iface) = pinned_iface(&file_name)
            && !listed.iter().any(|l| l == iface)
        {
            detach_pinned(&entry.path())?;
            detached.push(iface.to_owned());
        }
    }
    Ok(detached)
}

/// Removes every attachment pinned under `bpffs`; returns the interfaces.
///
/// # Errors
/// A pin that cannot be read or removed.
pub fn detach_all(bpffs: &Path) -> Result<Vec<String>> {
    let mut detached = Vec::new();
    for entry in fs::read_dir(bpffs).with_context(|| format!("reading {}", bpffs.display()))? {
        let entry = entry.with_context(|| format!("reading {}", bpffs.display()))?;
        let file_name = entry.file_name().to_string_lossy().into_owned();
        if let Some(iface) = pinned_iface(&file_name) {
            detach_pinned(&entry.path())?;
            detached.push(iface.to_owned());
        }
    }
    Ok(detached)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_puts_nics_on_native_xdp_and_everything_else_on_tc() {
        let virtual_kinds = [
            LinkKind::Veth,
            LinkKind::Bridge,
            LinkKind::Virtual("vlan".into()),
        ];
        for kind in &virtual_kinds {
            let (hook, _, fallback) = plan(ModeChoice::Auto, kind);
            assert_eq!((hook, fallback), (Hook::Tc, None), "{kind:?}");
        }
        let (hook, _, fallback) = plan(ModeChoice::Auto, &LinkKind::Device);
        assert_eq!((hook, fallback), (Hook::XdpNative, Some(Hook::Tc)));
    }

    #[test]
    fn explicit_modes_are_honoured_with_their_hazards_named() {
        for (choice, hook) in [
            (ModeChoice::Native, Hook::XdpNative),
            (ModeChoice::Skb, Hook::XdpGeneric),
            (ModeChoice::Tc, Hook::Tc),
        ] {
            assert_eq!(plan(choice, &LinkKind::Veth).0, hook);
            assert_eq!(plan(choice, &LinkKind::Veth).2, None);
        }
        assert!(hazard(Hook::XdpNative, &LinkKind::Veth).is_some());
        assert!(hazard(Hook::XdpGeneric, &LinkKind::Device).is_some());
        assert!(hazard(Hook::Tc, &LinkKind::Veth).is_none());
        assert!(hazard(Hook::XdpNative, &LinkKind::Device).is_none());
    }

    #[test]
    fn redirect_targets_leave_out_veths_unless_xdp_was_asked_for() {
        let links = [
            Link {
                name: "lo".into(),
                index: 1,
                kind: LinkKind::Device,
                xdp_program: None,
            },
            Link {
                name: "eth0".into(),
                index: 2,
                kind: LinkKind::Device,
                xdp_program: None,
            },
            Link {
                name: "veth1".into(),
                index: 3,
                kind: LinkKind::Veth,
                xdp_program: None,
            },
            Link {
                name: "br0".into(),
                index: 4,
                kind: LinkKind::Bridge,
                xdp_program: None,
            },
        ];
        let names = |choice| {
            redirect_targets(&links, choice)
                .iter()
                .map(|l| l.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(ModeChoice::Auto), ["eth0"]);
        assert_eq!(names(ModeChoice::Tc), ["eth0"]);
        assert_eq!(names(ModeChoice::Native), ["eth0", "veth1"]);
    }

    #[test]
    fn pins_name_their_interface_and_hook() {
        let dir = Path::new("/sys/fs/bpf/xlb");
        let pin = pin_path(dir, "veth-web1", Hook::Tc);
        assert_eq!(pin, dir.join("link_veth-web1:tc"));
        assert_eq!(pinned_iface("link_veth-web1:tc"), Some("veth-web1"));
        assert_eq!(pinned_iface("link_eth0"), Some("eth0"));
        assert_eq!(pinned_iface("XLB_VIPS"), None);
    }
}
