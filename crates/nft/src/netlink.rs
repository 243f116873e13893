//! nf_tables over netlink, natively: a [`Batch`] of table/chain/rule/set/element messages that
//! the kernel applies as one atomic transaction, sent with one `sendmsg` and no process spawned,
//! and the few dumps an applier needs to adopt what a previous run left (chain names, set names,
//! map elements). Only the expressions flatnet uses are encoded; their layout mirrors what
//! `nft --debug=netlink` shows for the same rule, so `nft list` prints them the usual way.

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
use nix::sys::socket::{setsockopt, sockopt};
use std::borrow::Borrow;
use std::os::fd::AsRawFd;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;

// nf_tables message types.
const GETTABLE: u16 = 1;
const NEWCHAIN: u16 = 3;
const GETCHAIN: u16 = 4;
const DELCHAIN: u16 = 5;
const NEWRULE: u16 = 6;
const NEWSET: u16 = 9;
const GETSET: u16 = 10;
const DELSET: u16 = 11;
const NEWSETELEM: u16 = 12;
const GETSETELEM: u16 = 13;
const DELSETELEM: u16 = 14;

const SET_TIMEOUT: u32 = 0x10;
const SET_EVAL: u32 = 0x20;
/// nft's datatype numbers, which `nft list` uses to print keys.
pub const TYPE_IPV4_ADDR: u32 = 7;

/// The family of a table (`NFPROTO_*`).
pub const FAMILY_IPV4: u8 = 2;

/// Where a verdict sends the packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Drop,
    Accept,
    Return,
    Jump(String),
    Goto(String),
}

impl Verdict {
    fn code(&self) -> i32 {
        match self {
            Verdict::Drop => 0,
            Verdict::Accept => 1,
            Verdict::Return => -5,
            Verdict::Jump(_) => -3,
            Verdict::Goto(_) => -4,
        }
    }
    fn chain(&self) -> Option<&str> {
        match self {
            Verdict::Jump(c) | Verdict::Goto(c) => Some(c),
            _ => None,
        }
    }
}

/// Registers: 0 is the verdict, 1–4 are the 16-byte ones nft uses for single values.
pub const REG_VERDICT: u32 = 0;
pub const REG_1: u32 = 1;
pub const REG_2: u32 = 2;

/// The 4-byte register `i` (`NFT_REG32_00` + i): concatenations are loaded into consecutive
/// ones, as nft allocates them, so that `nft list` reads the fields back.
pub const fn reg32(i: u32) -> u32 {
    8 + i
}

/// The expressions flatnet's rules are made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// Loads `len` bytes at `offset` of the network (1) or transport (2) header.
    Payload {
        base: u32,
        offset: u32,
        len: u32,
        dreg: u32,
    },
    /// `meta` key (`NFT_META_*`) into a register.
    Meta { key: u32, dreg: u32 },
    /// Register compared with data: `eq` or not.
    Cmp { sreg: u32, eq: bool, data: Vec<u8> },
    /// `reg = (reg & mask) ^ xor`.
    Bitwise {
        reg: u32,
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    /// Data into a register.
    Immediate { dreg: u32, data: Vec<u8> },
    /// A verdict.
    Verdict(Verdict),
    /// `numgen random mod modulus` into a register.
    Random { modulus: u32, dreg: u32 },
    /// A set lookup: a match; with `dreg`, a data-map lookup that loads the element's data.
    Lookup {
        set: String,
        sreg: u32,
        dreg: Option<u32>,
    },
    /// `update @set { key }`: adds the key or refreshes its timeout.
    Update { set: String, sreg: u32 },
    /// DNAT to the address in `addr` and the port in `port` (IPv4), with `NF_NAT_RANGE_*` flags
    /// (0: none sent, as nft does for a mapped `addr . port`).
    Dnat { addr: u32, port: u32, flags: u32 },
}

/// What a set element carries besides its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    /// A plain set's element: the key alone.
    None,
    /// A verdict map's: where it sends.
    Verdict(Verdict),
    /// A data map's: the value's bytes (each concatenated field padded to 4 bytes).
    Value(Vec<u8>),
}

/// A set or map element: key bytes, what it carries and its comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    pub key: Vec<u8>,
    /// The last key of a range, in a set of concatenated ranges (`flags interval` with a
    /// concatenated type, which the kernel keeps as one element from `key` to `key_end`).
    pub key_end: Option<Vec<u8>>,
    pub data: Data,
    pub comment: Option<String>,
}

impl Element {
    pub fn new(key: Vec<u8>, data: Data) -> Element {
        Element {
            key,
            key_end: None,
            data,
            comment: None,
        }
    }

    /// A range element of a concatenated interval set: `key` to `key_end`, both included.
    pub fn range(key: Vec<u8>, key_end: Vec<u8>) -> Element {
        Element {
            key_end: Some(key_end),
            ..Element::new(key, Data::None)
        }
    }
}

/// Attribute writer: nested TLVs, each padded to 4 bytes, written in place (a nest reserves its
/// header and patches the length once its content is in), so a batch of 400k messages costs no
/// allocation per attribute.
#[derive(Default)]
struct Attrs(Vec<u8>);

impl Attrs {
    fn header(&mut self, ty: u16, len: usize) {
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&ty.to_ne_bytes());
    }
    fn pad(&mut self) {
        self.0.resize(self.0.len().next_multiple_of(4), 0);
    }
    fn put(&mut self, ty: u16, data: &[u8]) -> &mut Self {
        self.header(ty, 4 + data.len());
        self.0.extend_from_slice(data);
        self.pad();
        self
    }
    fn str(&mut self, ty: u16, s: &str) -> &mut Self {
        self.header(ty, 4 + s.len() + 1);
        self.0.extend_from_slice(s.as_bytes());
        self.0.push(0);
        self.pad();
        self
    }
    fn u32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.put(ty, &v.to_be_bytes())
    }
    fn nest(&mut self, ty: u16, f: impl FnOnce(&mut Attrs)) -> &mut Self {
        let start = self.0.len();
        self.header(ty | NLA_F_NESTED, 0);
        f(self);
        let len = (self.0.len() - start) as u16;
        self.0[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }
}

/// `nft`'s comment encoding (a userdata TLV of type 0, NUL-terminated).
fn comment_udata(comment: &str) -> Vec<u8> {
    let mut v = vec![0u8, (comment.len() + 1).min(255) as u8];
    v.extend_from_slice(&comment.as_bytes()[..comment.len().min(254)]);
    v.push(0);
    v
}

/// The comment in a userdata blob (TLVs of one-byte type and length), or "".
fn udata_comment(udata: Option<&[u8]>) -> String {
    let mut b = udata.unwrap_or_default();
    while b.len() >= 2 {
        let (ty, len) = (b[0], b[1] as usize);
        let Some(value) = b.get(2..2 + len) else {
            break;
        };
        if ty == 0 {
            return string(value);
        }
        b = &b[2 + len..];
    }
    String::new()
}

fn data_value(a: &mut Attrs, ty: u16, data: &[u8]) {
    a.nest(ty, |d| {
        d.put(1, data);
    });
}

fn data_verdict(a: &mut Attrs, ty: u16, v: &Verdict) {
    a.nest(ty, |d| {
        d.nest(2, |vd| {
            vd.put(1, &v.code().to_be_bytes());
            if let Some(c) = v.chain() {
                vd.str(2, c);
            }
        });
    });
}

fn expr_name(e: &Expr) -> &'static str {
    match e {
        Expr::Payload { .. } => "payload",
        Expr::Meta { .. } => "meta",
        Expr::Cmp { .. } => "cmp",
        Expr::Bitwise { .. } => "bitwise",
        Expr::Immediate { .. } | Expr::Verdict(_) => "immediate",
        Expr::Random { .. } => "numgen",
        Expr::Lookup { .. } => "lookup",
        Expr::Update { .. } => "dynset",
        Expr::Dnat { .. } => "nat",
    }
}

fn expr(list: &mut Attrs, e: &Expr) {
    list.nest(1, |el| {
        el.str(1, expr_name(e));
        el.nest(2, |b| match e {
            Expr::Payload {
                base,
                offset,
                len,
                dreg,
            } => {
                b.u32(1, *dreg).u32(2, *base).u32(3, *offset).u32(4, *len);
            }
            Expr::Meta { key, dreg } => {
                b.u32(2, *key).u32(1, *dreg);
            }
            Expr::Cmp { sreg, eq, data } => {
                b.u32(1, *sreg).u32(2, if *eq { 0 } else { 1 });
                data_value(b, 3, data);
            }
            Expr::Bitwise { reg, mask, xor } => {
                b.u32(1, *reg).u32(2, *reg).u32(3, mask.len() as u32);
                data_value(b, 4, mask);
                data_value(b, 5, xor);
            }
            Expr::Immediate { dreg, data } => {
                b.u32(1, *dreg);
                data_value(b, 2, data);
            }
            Expr::Verdict(v) => {
                b.u32(1, REG_VERDICT);
                data_verdict(b, 2, v);
            }
            Expr::Random { modulus, dreg } => {
                b.u32(1, *dreg).u32(2, *modulus).u32(3, 1).u32(4, 0);
            }
            Expr::Lookup { set, sreg, dreg } => {
                b.str(1, set).u32(2, *sreg);
                if let Some(d) = dreg {
                    b.u32(3, *d);
                }
            }
            Expr::Update { set, sreg } => {
                b.str(1, set).u32(3, 1).u32(4, *sreg);
            }
            Expr::Dnat { addr, port, flags } => {
                b.u32(1, 1)
                    .u32(2, FAMILY_IPV4 as u32)
                    .u32(3, *addr)
                    .u32(5, *port);
                if *flags != 0 {
                    b.u32(7, *flags);
                }
            }
        });
    });
}

/// One transaction's messages. Nothing reaches the kernel until [`Conn::commit`].
pub struct Batch {
    family: u8,
    table: String,
    buf: Vec<u8>,
    messages: u32,
    next_set_id: u32,
}

impl Batch {
    pub fn new(family: u8, table: &str) -> Batch {
        // The batch's begin message leads the buffer (its sequence number is set at the
        // commit), so a commit sends the buffer as built, without a copy the batch's size.
        let mut buf = Vec::new();
        push_msg(
            &mut buf,
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            0,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        Batch {
            family,
            table: table.to_string(),
            buf,
            messages: 0,
            next_set_id: 1,
        }
    }

    /// How many messages are queued.
    pub fn len(&self) -> u32 {
        self.messages
    }

    pub fn is_empty(&self) -> bool {
        self.messages == 0
    }

    /// Appends one message about an object of this batch's table, its attributes written in
    /// place by `f` after the table's name.
    fn msg(&mut self, ty: u16, flags: u16, f: impl FnOnce(&mut Attrs)) {
        let mut a = Attrs(std::mem::take(&mut self.buf));
        let start = a.0.len();
        push_msg(
            &mut a.0,
            (NFNL_SUBSYS_NFTABLES << 8) | ty,
            NLM_F_REQUEST | flags,
            0,
            self.family,
            0,
            &[],
        );
        a.str(1, &self.table);
        f(&mut a);
        let len = (a.0.len() - start) as u32;
        a.0[start..start + 4].copy_from_slice(&len.to_ne_bytes());
        self.buf = a.0;
        self.messages += 1;
    }

    /// Creates a regular chain (no error if it exists) with an optional comment.
    pub fn add_chain(&mut self, name: &str, comment: Option<&str>) {
        self.msg(NEWCHAIN, NLM_F_CREATE, |a| {
            a.str(3, name);
            if let Some(c) = comment {
                a.put(12, &comment_udata(c));
            }
        });
    }

    /// Deletes a chain and the rules in it.
    pub fn delete_chain(&mut self, name: &str) {
        self.msg(DELCHAIN, 0, |a| {
            a.str(3, name);
        });
    }

    /// Appends a rule to a chain.
    pub fn add_rule(&mut self, chain: &str, exprs: &[Expr]) {
        self.msg(NEWRULE, NLM_F_CREATE | NLM_F_APPEND, |a| {
            a.str(2, chain).nest(4, |l| {
                for e in exprs {
                    expr(l, e);
                }
            });
        });
    }

    /// A named IPv4-address set whose members expire `timeout_s` after their last update
    /// (`flags dynamic,timeout`), for `update @set { ip saddr }`.
    pub fn add_timeout_set(&mut self, name: &str, timeout_s: u32) {
        let id = self.next_set_id;
        self.next_set_id += 1;
        self.msg(NEWSET, NLM_F_CREATE, |a| {
            a.str(2, name)
                .u32(3, SET_TIMEOUT | SET_EVAL)
                .u32(4, TYPE_IPV4_ADDR)
                .u32(5, 4)
                .u32(10, id)
                .put(11, &(u64::from(timeout_s) * 1000).to_be_bytes());
        });
    }

    pub fn delete_set(&mut self, name: &str) {
        self.msg(DELSET, 0, |a| {
            a.str(2, name);
        });
    }

    fn elements<E: Borrow<Element>>(
        &mut self,
        ty: u16,
        set: &str,
        elements: impl IntoIterator<Item = E>,
    ) {
        // An element already there is an error, not a silent no-op: what a caller counts is
        // what the kernel holds.
        let flags = if ty == NEWSETELEM {
            NLM_F_CREATE | NLM_F_EXCL
        } else {
            0
        };
        // Kept well under the 64 KiB a netlink attribute can hold.
        let mut elements = elements.into_iter().peekable();
        while elements.peek().is_some() {
            let chunk = elements.by_ref().take(256);
            self.msg(ty, flags, |a| {
                a.str(2, set).nest(3, |list| {
                    for e in chunk {
                        let e = e.borrow();
                        list.nest(1, |el| {
                            data_value(el, 1, &e.key);
                            if let Some(end) = &e.key_end {
                                data_value(el, 10, end);
                            }
                            match &e.data {
                                Data::Verdict(v) if ty == NEWSETELEM => data_verdict(el, 2, v),
                                Data::Value(v) if ty == NEWSETELEM => data_value(el, 2, v),
                                _ => {}
                            }
                            if let (Some(c), NEWSETELEM) = (&e.comment, ty) {
                                el.put(6, &comment_udata(c));
                            }
                        });
                    }
                });
            });
        }
    }

    /// Adds set or map elements (the key must not be present).
    pub fn add_elements<E: Borrow<Element>>(
        &mut self,
        set: &str,
        elements: impl IntoIterator<Item = E>,
    ) {
        self.elements(NEWSETELEM, set, elements);
    }

    /// Deletes set or map elements by key.
    pub fn delete_elements(&mut self, set: &str, keys: &[Vec<u8>]) {
        let elements = keys.iter().map(|k| Element::new(k.clone(), Data::None));
        self.elements(DELSETELEM, set, elements);
    }

    /// Deletes elements given whole (a range element is named by its key and key end).
    pub fn remove_elements<E: Borrow<Element>>(
        &mut self,
        set: &str,
        elements: impl IntoIterator<Item = E>,
    ) {
        self.elements(DELSETELEM, set, elements);
    }

    /// Removes every element of a set (what `nft flush set` sends).
    pub fn flush_set(&mut self, set: &str) {
        self.msg(DELSETELEM, 0, |a| {
            a.str(2, set);
        });
    }
}

fn push_msg(buf: &mut Vec<u8>, ty: u16, flags: u16, seq: u32, family: u8, res_id: u16, a: &[u8]) {
    let len = 16 + 4 + a.len();
    buf.extend_from_slice(&(len as u32).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.push(family);
    buf.push(0);
    buf.extend_from_slice(&res_id.to_be_bytes());
    buf.extend_from_slice(a);
}

/// A netlink message as received.
struct Msg<'a> {
    ty: u16,
    seq: u32,
    payload: &'a [u8],
}

fn messages(buf: &[u8]) -> Vec<Msg<'_>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 16 <= buf.len() {
        let len = u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4")) as usize;
        if len < 16 || at + len > buf.len() {
            break;
        }
        out.push(Msg {
            ty: u16::from_ne_bytes(buf[at + 4..at + 6].try_into().expect("2")),
            seq: u32::from_ne_bytes(buf[at + 8..at + 12].try_into().expect("4")),
            payload: &buf[at + 16..at + len],
        });
        at += len.next_multiple_of(4);
    }
    out
}

/// Attributes of a message body (type without the nested flag, data).
fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let ty = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((ty, &b[4..len]));
        b = &b[len.next_multiple_of(4).min(b.len())..];
    }
    out
}

fn attr<'a>(list: &[(u16, &'a [u8])], ty: u16) -> Option<&'a [u8]> {
    list.iter().find(|(t, _)| *t == ty).map(|(_, d)| *d)
}

fn string(b: &[u8]) -> String {
    String::from_utf8_lossy(b.split(|c| *c == 0).next().unwrap_or_default()).into_owned()
}

/// What the message with sequence number `seq` in `buf` did, e.g. `NEWRULE in chain svc_…`.
fn describe(buf: &[u8], seq: u32) -> String {
    let Some(m) = messages(buf).into_iter().find(|m| m.seq == seq) else {
        return "a message".into();
    };
    let what = match m.ty & 0xff {
        NEWCHAIN => "creating chain",
        DELCHAIN => "deleting chain",
        NEWRULE => "adding a rule to chain",
        NEWSET => "creating set",
        DELSET => "deleting set",
        NEWSETELEM => "adding elements to",
        DELSETELEM => "deleting elements from",
        _ => "message",
    };
    let at = attrs(m.payload.get(4..).unwrap_or_default());
    let name = match m.ty & 0xff {
        NEWCHAIN | DELCHAIN => attr(&at, 3),
        _ => attr(&at, 2),
    };
    format!("{what} {}", name.map(string).unwrap_or_default())
}

/// A netfilter netlink socket in the calling thread's network namespace.
pub struct Conn {
    socket: Socket,
    seq: u32,
    /// Time spent in exchanges with the kernel (its share of what this connection did).
    waited: std::time::Duration,
}

impl Conn {
    pub fn open() -> std::io::Result<Conn> {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Conn {
            socket,
            seq: 1,
            waited: std::time::Duration::ZERO,
        })
    }

    /// Time spent so far sending to the kernel and waiting for its answers: a transaction's
    /// commit runs in that time, in the kernel.
    pub fn waited(&self) -> std::time::Duration {
        self.waited
    }

    fn timed<T>(&mut self, f: impl FnOnce(&mut Conn) -> T) -> T {
        let t = std::time::Instant::now();
        let out = f(self);
        self.waited += t.elapsed();
        out
    }

    /// Sends `batch` as one transaction; an error names the first message the kernel refused.
    pub fn commit(&mut self, batch: Batch) -> Result<(), String> {
        self.timed(|c| c.commit_now(batch))
    }

    fn commit_now(&mut self, batch: Batch) -> Result<(), String> {
        if batch.is_empty() {
            return Ok(());
        }
        // Sequence numbers: begin, each message, end. Only the last message asks for an ack;
        // failures are reported whatever the flags.
        let first = self.seq;
        let mut body = batch.buf;
        body[8..12].copy_from_slice(&first.to_ne_bytes());
        let mut at = u32::from_ne_bytes(body[..4].try_into().expect("4")) as usize;
        let mut seq = first;
        let mut last_seq = first;
        while at < body.len() {
            let len = u32::from_ne_bytes(body[at..at + 4].try_into().expect("4")) as usize;
            seq += 1;
            body[at + 8..at + 12].copy_from_slice(&seq.to_ne_bytes());
            if at + len >= body.len() {
                let flags = u16::from_ne_bytes([body[at + 6], body[at + 7]]) | NLM_F_ACK;
                body[at + 6..at + 8].copy_from_slice(&flags.to_ne_bytes());
                last_seq = seq;
            }
            at += len;
        }
        let mut buf = body;
        push_msg(
            &mut buf,
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            seq + 1,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        self.seq = seq + 2;
        self.grow_send_buffer(buf.len());
        self.socket
            .send(&buf, 0)
            .map_err(|e| format!("sending {} nftables messages: {e}", batch.messages))?;
        let mut failure: Option<String> = None;
        loop {
            let (data, _) = self
                .socket
                .recv_from_full()
                .map_err(|e| format!("reading the kernel's answer: {e}"))?;
            for m in messages(&data) {
                if m.ty != NLMSG_ERROR || m.payload.len() < 4 {
                    continue;
                }
                let code = i32::from_ne_bytes(m.payload[..4].try_into().expect("4"));
                if code != 0 && failure.is_none() {
                    failure = Some(format!(
                        "the kernel refused {} (message {} of {}): {}",
                        describe(&buf, m.seq),
                        m.seq - first,
                        batch.messages,
                        std::io::Error::from_raw_os_error(-code)
                    ));
                }
                if m.seq == last_seq {
                    return failure.map_or(Ok(()), Err);
                }
            }
        }
    }

    fn grow_send_buffer(&self, len: usize) {
        // A batch must travel in one sendmsg; as root the buffer may exceed the sysctl limit.
        let size = (len + 4096).max(1 << 20);
        // SAFETY: the descriptor is our own socket's and outlives this call.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.socket.as_raw_fd()) };
        // Best effort: without it a large batch fails with a clear EMSGSIZE.
        let _ = setsockopt(&fd, sockopt::SndBufForce, &size);
    }

    fn dump(&mut self, ty: u16, family: u8, a: &Attrs) -> Result<Vec<Vec<u8>>, String> {
        self.timed(|c| c.dump_now(ty, family, a))
    }

    fn dump_now(&mut self, ty: u16, family: u8, a: &Attrs) -> Result<Vec<Vec<u8>>, String> {
        let seq = self.seq;
        self.seq += 1;
        let mut buf = Vec::new();
        push_msg(
            &mut buf,
            (NFNL_SUBSYS_NFTABLES << 8) | ty,
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            family,
            0,
            &a.0,
        );
        self.socket
            .send(&buf, 0)
            .map_err(|e| format!("asking the kernel for a dump: {e}"))?;
        let mut out = Vec::new();
        loop {
            let (data, _) = self
                .socket
                .recv_from_full()
                .map_err(|e| format!("reading a dump: {e}"))?;
            for m in messages(&data) {
                if m.seq != seq {
                    continue;
                }
                match m.ty {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let code = i32::from_ne_bytes(m.payload[..4].try_into().expect("4"));
                        if code == -2 {
                            // No such table or set: nothing to list.
                            return Ok(out);
                        }
                        if code != 0 {
                            return Err(format!(
                                "dump: {}",
                                std::io::Error::from_raw_os_error(-code)
                            ));
                        }
                    }
                    _ => out.push(m.payload.get(4..).unwrap_or_default().to_vec()),
                }
            }
        }
    }

    /// Which of `names` exist in `table` as chains (`sets` false) or named sets and maps, asked
    /// one by one (a hash lookup each in the kernel) in batches of requests: unlike a dump, whose
    /// every round walks the table's list again from its start, the cost is linear.
    pub fn existing(
        &mut self,
        family: u8,
        table: &str,
        sets: bool,
        names: &[&str],
    ) -> Result<std::collections::BTreeSet<String>, String> {
        self.timed(|c| c.existing_now(family, table, sets, names))
    }

    fn existing_now(
        &mut self,
        family: u8,
        table: &str,
        sets: bool,
        names: &[&str],
    ) -> Result<std::collections::BTreeSet<String>, String> {
        // Replies per round stay well inside the socket's receive buffer.
        const ROUND: usize = 256;
        let (ty, name_attr) = if sets { (GETSET, 2) } else { (GETCHAIN, 3) };
        let mut found = std::collections::BTreeSet::new();
        for round in names.chunks(ROUND) {
            let requests: Vec<Attrs> = round
                .iter()
                .map(|name| {
                    let mut a = Attrs::default();
                    a.str(1, table).str(name_attr, name);
                    a
                })
                .collect();
            // One reply per request: the object, or an error (ENOENT: not there).
            self.requests(ty, 0, family, &requests, "objects", |i, m| {
                match error_code(m) {
                    Some(-2) => {}
                    Some(code) => {
                        return Err(format!(
                            "looking up {}: {}",
                            round[i],
                            std::io::Error::from_raw_os_error(-code)
                        ))
                    }
                    None => {
                        found.insert(round[i].to_string());
                    }
                }
                Ok(true)
            })?;
        }
        Ok(found)
    }

    /// A table's comment and its object count (chains, sets and maps: the kernel's `use`);
    /// `None` when there is no such table.
    pub fn table_info(&mut self, family: u8, table: &str) -> Result<Option<(String, u32)>, String> {
        let mut a = Attrs::default();
        a.str(1, table);
        Ok(self.dump(GETTABLE, family, &a)?.iter().find_map(|body| {
            let at = attrs(body);
            (string(attr(&at, 1)?) == table).then(|| {
                let used = attr(&at, 3)
                    .and_then(|u| u.try_into().ok())
                    .map_or(0, u32::from_be_bytes);
                (udata_comment(attr(&at, 6)), used)
            })
        }))
    }

    /// The chains of `table` (name, comment).
    pub fn chains(&mut self, family: u8, table: &str) -> Result<Vec<(String, String)>, String> {
        let mut a = Attrs::default();
        a.str(1, table);
        Ok(self
            .dump(GETCHAIN, family, &a)?
            .iter()
            .filter_map(|body| {
                let at = attrs(body);
                (string(attr(&at, 1)?) == table).then(|| {
                    let comment = udata_comment(attr(&at, 12));
                    (string(attr(&at, 3).unwrap_or_default()), comment)
                })
            })
            .collect())
    }

    /// The named sets and maps of `table`.
    pub fn sets(&mut self, family: u8, table: &str) -> Result<Vec<String>, String> {
        let mut a = Attrs::default();
        a.str(1, table);
        Ok(self
            .dump(GETSET, family, &a)?
            .iter()
            .filter_map(|body| {
                let at = attrs(body);
                (string(attr(&at, 1)?) == table).then(|| string(attr(&at, 2).unwrap_or_default()))
            })
            .filter(|name| !name.starts_with("__"))
            .collect())
    }

    /// The elements of a set, a verdict map or a data map.
    pub fn elements(&mut self, family: u8, table: &str, map: &str) -> Result<Vec<Element>, String> {
        let mut a = Attrs::default();
        a.str(1, table).str(2, map);
        Ok(self
            .dump(GETSETELEM, family, &a)?
            .iter()
            .flat_map(|body| parse_elements(body))
            .collect())
    }

    /// The elements of a set whose elements carry a counter (`counter` in its declaration),
    /// each with its packet count.
    pub fn counted_elements(
        &mut self,
        family: u8,
        table: &str,
        set: &str,
    ) -> Result<Vec<(Vec<u8>, u64)>, String> {
        let mut a = Attrs::default();
        a.str(1, table).str(2, set);
        Ok(self
            .dump(GETSETELEM, family, &a)?
            .iter()
            .flat_map(|body| parse_counted(body))
            .collect())
    }

    /// The elements of `set` with these keys, as the kernel holds them (`None`: not there),
    /// asked for by key — a hash lookup each — in rounds of requests of many keys: unlike a
    /// dump, whose every round walks the set from its start again, the cost is linear.
    pub fn get_elements(
        &mut self,
        family: u8,
        table: &str,
        set: &str,
        keys: &[Vec<u8>],
    ) -> Result<Vec<Option<Element>>, String> {
        // Replies per round (one message each) stay well inside the receive buffer.
        const PER_REQUEST: usize = 64;
        const PER_ROUND: usize = 1024;
        let mut found = std::collections::HashMap::new();
        let mut again: Vec<Vec<u8>> = Vec::new();
        self.grow_receive_buffer();
        for round in keys.chunks(PER_ROUND) {
            let requests: Vec<&[Vec<u8>]> = round.chunks(PER_REQUEST).collect();
            // A request stops at its first missing key: its keys are asked for one by one.
            let refused =
                self.timed(|c| c.ask_elements(family, table, set, &requests, &mut found))?;
            for failed in refused {
                again.extend(
                    requests[failed]
                        .iter()
                        .filter(|k| !found.contains_key(*k))
                        .cloned(),
                );
            }
        }
        for round in again.chunks(PER_ROUND) {
            let requests: Vec<&[Vec<u8>]> = round.chunks(1).collect();
            self.timed(|c| c.ask_elements(family, table, set, &requests, &mut found))?;
        }
        Ok(keys.iter().map(|k| found.remove(k)).collect())
    }

    /// Sends one GETSETELEM request per slice of keys, each acknowledged, and files the
    /// elements the kernel answers with; returns the requests it refused (a key not there).
    fn ask_elements(
        &mut self,
        family: u8,
        table: &str,
        set: &str,
        requests: &[&[Vec<u8>]],
        found: &mut std::collections::HashMap<Vec<u8>, Element>,
    ) -> Result<Vec<usize>, String> {
        let bodies: Vec<Attrs> = requests
            .iter()
            .map(|keys| {
                let mut a = Attrs::default();
                a.str(1, table).str(2, set).nest(3, |list| {
                    for key in *keys {
                        list.nest(1, |el| data_value(el, 1, key));
                    }
                });
                a
            })
            .collect();
        let mut failed = Vec::new();
        // Each request's elements, then its ack (or the error that stopped it).
        self.requests(
            GETSETELEM,
            NLM_F_ACK,
            family,
            &bodies,
            "elements",
            |i, m| {
                match error_code(m) {
                    None => found.extend(
                        parse_elements(m.payload.get(4..).unwrap_or_default())
                            .into_iter()
                            .map(|e| (e.key.clone(), e)),
                    ),
                    Some(0) => {}
                    Some(-2) => failed.push(i),
                    Some(code) => {
                        return Err(format!(
                            "looking up elements of {set}: {}",
                            std::io::Error::from_raw_os_error(-code)
                        ))
                    }
                }
                Ok(error_code(m).is_some())
            },
        )?;
        Ok(failed)
    }

    /// Sends one request of type `ty` per body (sequence numbers in order, in one `sendmsg`)
    /// and hands each answering message to `on`, with the index of its request, until `on` has
    /// said every request is answered.
    fn requests(
        &mut self,
        ty: u16,
        flags: u16,
        family: u8,
        bodies: &[Attrs],
        what: &str,
        mut on: impl FnMut(usize, &Msg) -> Result<bool, String>,
    ) -> Result<(), String> {
        let first = self.seq;
        let mut buf = Vec::new();
        for (i, a) in bodies.iter().enumerate() {
            push_msg(
                &mut buf,
                (NFNL_SUBSYS_NFTABLES << 8) | ty,
                NLM_F_REQUEST | flags,
                first + i as u32,
                family,
                0,
                &a.0,
            );
        }
        self.seq += bodies.len() as u32;
        self.socket
            .send(&buf, 0)
            .map_err(|e| format!("asking the kernel for {} {what}: {e}", bodies.len()))?;
        let mut answered = 0;
        while answered < bodies.len() {
            let (data, _) = self
                .socket
                .recv_from_full()
                .map_err(|e| format!("reading {what}: {e}"))?;
            for m in messages(&data) {
                let Some(i) = m.seq.checked_sub(first).map(|i| i as usize) else {
                    continue;
                };
                if i < bodies.len() && on(i, &m)? {
                    answered += 1;
                }
            }
        }
        Ok(())
    }

    fn grow_receive_buffer(&self) {
        // SAFETY: the descriptor is our own socket's and outlives this call.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.socket.as_raw_fd()) };
        // Best effort, as root: without it a round of replies can overflow and fail clearly.
        let _ = setsockopt(&fd, sockopt::RcvBufForce, &(8 << 20));
    }
}

/// The code of an error or acknowledgement message (0: acknowledged), `None` for any other.
fn error_code(m: &Msg) -> Option<i32> {
    (m.ty == NLMSG_ERROR && m.payload.len() >= 4)
        .then(|| i32::from_ne_bytes(m.payload[..4].try_into().expect("4")))
}

/// Each element's key and attributes in a NEWSETELEM message body.
fn element_attrs(body: &[u8]) -> impl Iterator<Item = (Vec<u8>, Vec<(u16, &[u8])>)> {
    attrs(body)
        .into_iter()
        .filter(|(ty, _)| *ty == 3)
        .flat_map(|(_, list)| attrs(list))
        .map(|(_, el)| {
            let el = attrs(el);
            let key = attr(&el, 1)
                .and_then(|k| attr(&attrs(k), 1))
                .unwrap_or_default()
                .to_vec();
            (key, el)
        })
}

/// Key and packet count of each element: the counter is the element's expression
/// (`NFTA_SET_ELEM_EXPR`, or the first of `NFTA_SET_ELEM_EXPRESSIONS`) named "counter".
fn parse_counted(body: &[u8]) -> Vec<(Vec<u8>, u64)> {
    let counter = |expr: &[u8]| {
        let e = attrs(expr);
        (attr(&e, 1).map(string).as_deref() == Some("counter"))
            .then(|| attr(&attrs(attr(&e, 2)?), 2)?.try_into().ok())
            .flatten()
            .map(u64::from_be_bytes)
    };
    element_attrs(body)
        .filter_map(|(key, el)| {
            let listed = || attrs(attr(&el, 10)?).iter().find_map(|(_, x)| counter(x));
            let packets = attr(&el, 7).and_then(counter).or_else(listed)?;
            Some((key, packets))
        })
        .collect()
}

/// The elements in a NEWSETELEM message body.
fn parse_elements(body: &[u8]) -> Vec<Element> {
    element_attrs(body)
        .map(|(key, el)| {
            let data = attr(&el, 2).map(attrs).unwrap_or_default();
            let data = if let Some(v) = attr(&data, 2) {
                let v = attrs(v);
                let code = attr(&v, 1)
                    .and_then(|c| c.try_into().ok())
                    .map(i32::from_be_bytes)
                    .unwrap_or(0);
                let chain = attr(&v, 2).map(string).unwrap_or_default();
                Data::Verdict(match code {
                    -3 => Verdict::Jump(chain),
                    -4 => Verdict::Goto(chain),
                    -5 => Verdict::Return,
                    1 => Verdict::Accept,
                    _ => Verdict::Drop,
                })
            } else if let Some(v) = attr(&data, 1) {
                Data::Value(v.to_vec())
            } else {
                Data::None
            };
            let comment = attr(&el, 6).map(|u| udata_comment(Some(u)));
            Element {
                key,
                key_end: None,
                data,
                comment,
            }
        })
        .collect()
}

/// A packet copied to an nflog group (`log group N` in a rule): the rule's prefix and the first
/// bytes of the packet from its network header on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    pub prefix: String,
    pub payload: Vec<u8>,
}

/// A subscription to one nflog group (nfnetlink_log), as `ulogd` makes one.
pub struct LogGroup {
    socket: Socket,
    buf: Vec<u8>,
}

const NFNL_SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_PACKET: u16 = 0;
const NFULNL_MSG_CONFIG: u16 = 1;

impl LogGroup {
    /// Binds `group` in the calling thread's network namespace, copying `copy` bytes of each
    /// packet (headers are all a reader needs).
    pub fn bind(group: u16, copy: u32) -> std::io::Result<LogGroup> {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        let ty = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG;
        let mut msg = Vec::new();
        // NFULA_CFG_CMD = 1: NFULNL_CFG_CMD_BIND (1).
        let mut a = Attrs::default();
        a.put(1, &[1]);
        push_msg(&mut msg, ty, NLM_F_REQUEST | NLM_F_ACK, 1, 0, group, &a.0);
        // NFULA_CFG_MODE = 2: copy range (big-endian), NFULNL_COPY_PACKET (2), padding.
        let mut a = Attrs::default();
        let mut mode = copy.to_be_bytes().to_vec();
        mode.extend_from_slice(&[2, 0]);
        a.put(2, &mode);
        push_msg(&mut msg, ty, NLM_F_REQUEST | NLM_F_ACK, 2, 0, group, &a.0);
        socket.send(&msg, 0)?;
        let mut g = LogGroup {
            socket,
            buf: vec![0; 1 << 16],
        };
        let mut acked = 0;
        while acked < 2 {
            let n = g.socket.recv(&mut &mut g.buf[..], 0)?;
            for m in messages(&g.buf[..n]) {
                match error_code(&m) {
                    Some(0) => acked += 1,
                    Some(e) => return Err(std::io::Error::from_raw_os_error(-e)),
                    None => {}
                }
            }
        }
        Ok(g)
    }

    /// Waits for the next packets.
    pub fn recv(&mut self) -> std::io::Result<Vec<Logged>> {
        let n = self.socket.recv(&mut &mut self.buf[..], 0)?;
        let mut out = Vec::new();
        for m in messages(&self.buf[..n]) {
            if m.ty != (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET || m.payload.len() < 4 {
                continue;
            }
            let list = attrs(&m.payload[4..]);
            // NFULA_PAYLOAD = 9, NFULA_PREFIX = 10.
            out.push(Logged {
                prefix: attr(&list, 10).map(string).unwrap_or_default(),
                payload: attr(&list, 9).unwrap_or_default().to_vec(),
            });
        }
        Ok(out)
    }
}
