//! nf_tables constants (from the kernel's uapi `linux/netfilter/nf_tables.h`
//! and `nfnetlink.h`) and the messages that build floe's lock table.

use crate::msg::{self, Writer};
use crate::netlink::Batch;

pub(crate) const NFNL_SUBSYS_NFTABLES: u16 = 10;
pub(crate) const NFNL_MSG_BATCH_BEGIN: u16 = 16; // NLMSG_MIN_TYPE
pub(crate) const NFNL_MSG_BATCH_END: u16 = 17;

pub(crate) const NFT_MSG_NEWTABLE: u16 = 0;
pub(crate) const NFT_MSG_GETTABLE: u16 = 1;
pub(crate) const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_NEWSETELEM: u16 = 12;

// enum nft_table_attributes
pub(crate) const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
// enum nft_chain_attributes
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
// enum nft_hook_attributes
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
// enum nft_rule_attributes
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
// enum nft_list_attributes
const NFTA_LIST_ELEM: u16 = 1;
// enum nft_expr_attributes
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
// enum nft_meta_attributes
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
// enum nft_cmp_attributes
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
// enum nft_data_attributes
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
// enum nft_verdict_attributes
const NFTA_VERDICT_CODE: u16 = 1;
// enum nft_immediate_attributes
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
// enum nft_payload_attributes
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
// enum nft_log_attributes
const NFTA_LOG_GROUP: u16 = 1;
const NFTA_LOG_QTHRESHOLD: u16 = 4;
// enum nft_lookup_attributes
const NFTA_LOOKUP_SET: u16 = 1;
const NFTA_LOOKUP_SREG: u16 = 2;
// enum nft_set_attributes
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_ID: u16 = 10;
// enum nft_set_elem_list_attributes
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
// enum nft_set_elem_attributes
const NFTA_SET_ELEM_KEY: u16 = 1;

// Registers: 0 is the verdict; 1..4 are the 16-byte registers; 8..23 the
// 4-byte ones, where 8 starts where 1 does.
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NFT_REG32_00: u32 = 8;
const NFT_REG32_15: u32 = 23;

const NFT_META_MARK: u32 = 3;
const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;
const NFT_CMP_EQ: u32 = 0;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;

// linux/netfilter.h
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
const NF_INET_PRE_ROUTING: u32 = 0;
const NF_INET_LOCAL_OUT: u32 = 3;
pub(crate) const NFPROTO_INET: u8 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

// Cross-check the hand-written values against libc's copies where it has them.
const _: () = {
    assert!(NFNL_SUBSYS_NFTABLES as i32 == libc::NFNL_SUBSYS_NFTABLES);
    assert!(NFNL_MSG_BATCH_BEGIN as i32 == libc::NFNL_MSG_BATCH_BEGIN);
    assert!(NFNL_MSG_BATCH_END as i32 == libc::NFNL_MSG_BATCH_END);
    assert!(NFT_MSG_NEWTABLE as i32 == libc::NFT_MSG_NEWTABLE);
    assert!(NFT_MSG_GETTABLE as i32 == libc::NFT_MSG_GETTABLE);
    assert!(NFT_MSG_DELTABLE as i32 == libc::NFT_MSG_DELTABLE);
    assert!(NFT_MSG_NEWCHAIN as i32 == libc::NFT_MSG_NEWCHAIN);
    assert!(NFT_MSG_NEWRULE as i32 == libc::NFT_MSG_NEWRULE);
    assert!(NFT_MSG_NEWSET as i32 == libc::NFT_MSG_NEWSET);
    assert!(NFT_MSG_NEWSETELEM as i32 == libc::NFT_MSG_NEWSETELEM);
    assert!(NFT_REG_VERDICT as i32 == libc::NFT_REG_VERDICT);
    assert!(NFT_REG_1 as i32 == libc::NFT_REG_1);
    assert!(NFT_REG32_00 as i32 == libc::NFT_REG32_00);
    assert!(NFT_REG32_15 as i32 == libc::NFT_REG32_15);
    assert!(NFT_META_MARK as i32 == libc::NFT_META_MARK);
    assert!(NFT_META_NFPROTO as i32 == libc::NFT_META_NFPROTO);
    assert!(NFT_META_L4PROTO as i32 == libc::NFT_META_L4PROTO);
    assert!(NFT_CMP_EQ as i32 == libc::NFT_CMP_EQ);
    assert!(NFT_PAYLOAD_NETWORK_HEADER as i32 == libc::NFT_PAYLOAD_NETWORK_HEADER);
    assert!(NFT_PAYLOAD_TRANSPORT_HEADER as i32 == libc::NFT_PAYLOAD_TRANSPORT_HEADER);
    assert!(NF_DROP as i32 == libc::NF_DROP);
    assert!(NF_ACCEPT as i32 == libc::NF_ACCEPT);
    assert!(NF_INET_PRE_ROUTING as i32 == libc::NF_INET_PRE_ROUTING);
    assert!(NF_INET_LOCAL_OUT as i32 == libc::NF_INET_LOCAL_OUT);
    assert!(NFPROTO_INET as i32 == libc::NFPROTO_INET);
    assert!(NFPROTO_IPV4 as i32 == libc::NFPROTO_IPV4);
    assert!(NFPROTO_IPV6 as i32 == libc::NFPROTO_IPV6);
};

/// The nft CLI's data type ids, only so that `nft list` can print the sets'
/// key types; the kernel does not interpret them. A concatenation's id is
/// its component ids, 6 bits each, first component highest.
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
const TYPE_INET_SERVICE: u32 = 13;
const TYPE_BITS: u32 = 6;

const fn concat_type(addr: u32) -> u32 {
    (((addr << TYPE_BITS | TYPE_INET_SERVICE) << TYPE_BITS | addr) << TYPE_BITS) | TYPE_INET_SERVICE
}

/// Base chain priority: before conntrack (-200), like the `raw` table.
pub const PRIORITY: i32 = -300;

/// Bytes one port takes in a concatenated key: a whole 32-bit register.
const PORT_SLOT: u32 = 4;

/// One IP family's part of the lock: its set and where its addresses are.
#[derive(Debug)]
pub(crate) struct Family {
    pub(crate) nfproto: u8,
    pub(crate) set: &'static str,
    /// Address length in bytes.
    pub(crate) addr_len: u32,
    saddr_offset: u32,
    daddr_offset: u32,
    key_type: u32,
    /// nft syntax of the address selector, for descriptions.
    nft_name: &'static str,
    /// Identifies the set within a batch (the kernel requires one).
    set_id: u32,
}

impl Family {
    /// Key bytes: address, port (padded to 4), address, port (padded to 4).
    pub(crate) const fn key_len(&self) -> u32 {
        2 * (self.addr_len + PORT_SLOT)
    }
}

pub(crate) const V4: Family = Family {
    nfproto: NFPROTO_IPV4,
    set: "conns4",
    addr_len: 4,
    saddr_offset: 12,
    daddr_offset: 16,
    key_type: concat_type(TYPE_IPADDR),
    nft_name: "ip",
    set_id: 1,
};

pub(crate) const V6: Family = Family {
    nfproto: NFPROTO_IPV6,
    set: "conns6",
    addr_len: 16,
    saddr_offset: 8,
    daddr_offset: 24,
    key_type: concat_type(TYPE_IP6ADDR),
    nft_name: "ip6",
    set_id: 2,
};

const _: () = assert!(V4.key_len() == 16);
const _: () = assert!(V6.key_len() == 40);
// The whole key must fit the 4-byte registers.
const _: () = assert!(NFT_REG32_00 + V6.key_len() / 4 - 1 <= NFT_REG32_15);

/// A base chain of the lock table.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Chain {
    pub(crate) name: &'static str,
    hook: u32,
    /// Packets arrive from the remote end (input) or leave toward it (output).
    inbound: bool,
}

/// Incoming packets are taken at prerouting, not input: a packet for a
/// service address this host has just given up is still seen (and kept
/// by a capture), where input would never see it.
pub(crate) const INPUT: Chain = Chain { name: "prerouting", hook: NF_INET_PRE_ROUTING, inbound: true };
pub(crate) const OUTPUT: Chain = Chain { name: "output", hook: NF_INET_LOCAL_OUT, inbound: false };

pub(crate) fn add_table(b: &mut Batch, table: &str) {
    b.add(
        NFT_MSG_NEWTABLE,
        NFPROTO_INET,
        msg::NLM_F_CREATE | msg::NLM_F_EXCL,
        format!("creating nftables table {table}"),
        |w| {
            w.put_str(NFTA_TABLE_NAME, table);
            w.put_be32(NFTA_TABLE_FLAGS, 0);
        },
    );
}

pub(crate) fn delete_table(b: &mut Batch, table: &str) {
    b.add(NFT_MSG_DELTABLE, NFPROTO_INET, 0, format!("deleting nftables table {table}"), |w| {
        w.put_str(NFTA_TABLE_NAME, table);
    });
}

/// A filter base chain at [`PRIORITY`] with policy accept.
pub(crate) fn add_chain(b: &mut Batch, table: &str, chain: Chain) {
    b.add(
        NFT_MSG_NEWCHAIN,
        NFPROTO_INET,
        msg::NLM_F_CREATE | msg::NLM_F_EXCL,
        format!("creating chain {} in nftables table {table}", chain.name),
        |w| {
            w.put_str(NFTA_CHAIN_TABLE, table);
            w.put_str(NFTA_CHAIN_NAME, chain.name);
            let hook = w.nest(NFTA_CHAIN_HOOK);
            w.put_be32(NFTA_HOOK_HOOKNUM, chain.hook);
            w.put_be32(NFTA_HOOK_PRIORITY, PRIORITY as u32);
            w.end_nest(hook);
            w.put_be32(NFTA_CHAIN_POLICY, NF_ACCEPT);
            w.put_str(NFTA_CHAIN_TYPE, "filter");
        },
    );
}

/// A hash set keyed by `family`'s concatenated 4-tuple.
pub(crate) fn add_set(b: &mut Batch, table: &str, family: &Family) {
    b.add(
        NFT_MSG_NEWSET,
        NFPROTO_INET,
        msg::NLM_F_CREATE | msg::NLM_F_EXCL,
        format!("creating set {} in nftables table {table}", family.set),
        |w| {
            w.put_str(NFTA_SET_TABLE, table);
            w.put_str(NFTA_SET_NAME, family.set);
            w.put_be32(NFTA_SET_FLAGS, 0);
            w.put_be32(NFTA_SET_KEY_TYPE, family.key_type);
            w.put_be32(NFTA_SET_KEY_LEN, family.key_len());
            w.put_be32(NFTA_SET_ID, family.set_id);
        },
    );
}

/// Writes one expression: a list element holding its name and data.
fn expr(w: &mut Writer, name: &str, data: impl FnOnce(&mut Writer)) {
    let elem = w.nest(NFTA_LIST_ELEM);
    w.put_str(NFTA_EXPR_NAME, name);
    let d = w.nest(NFTA_EXPR_DATA);
    data(w);
    w.end_nest(d);
    w.end_nest(elem);
}

fn meta_load(w: &mut Writer, key: u32, dreg: u32) {
    expr(w, "meta", |w| {
        w.put_be32(NFTA_META_DREG, dreg);
        w.put_be32(NFTA_META_KEY, key);
    });
}

fn cmp_eq(w: &mut Writer, sreg: u32, value: &[u8]) {
    expr(w, "cmp", |w| {
        w.put_be32(NFTA_CMP_SREG, sreg);
        w.put_be32(NFTA_CMP_OP, NFT_CMP_EQ);
        let data = w.nest(NFTA_CMP_DATA);
        w.put(NFTA_DATA_VALUE, value);
        w.end_nest(data);
    });
}

fn payload_load(w: &mut Writer, base: u32, offset: u32, len: u32, dreg: u32) {
    expr(w, "payload", |w| {
        w.put_be32(NFTA_PAYLOAD_DREG, dreg);
        w.put_be32(NFTA_PAYLOAD_BASE, base);
        w.put_be32(NFTA_PAYLOAD_OFFSET, offset);
        w.put_be32(NFTA_PAYLOAD_LEN, len);
    });
}

fn lookup(w: &mut Writer, set: &str, sreg: u32) {
    expr(w, "lookup", |w| {
        w.put_str(NFTA_LOOKUP_SET, set);
        w.put_be32(NFTA_LOOKUP_SREG, sreg);
    });
}

fn verdict(w: &mut Writer, code: u32) {
    expr(w, "immediate", |w| {
        w.put_be32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT);
        let data = w.nest(NFTA_IMMEDIATE_DATA);
        let v = w.nest(NFTA_DATA_VERDICT);
        w.put_be32(NFTA_VERDICT_CODE, code);
        w.end_nest(v);
        w.end_nest(data);
    });
}

fn add_rule(b: &mut Batch, table: &str, chain: Chain, text: &str, exprs: impl FnOnce(&mut Writer)) {
    b.add(
        NFT_MSG_NEWRULE,
        NFPROTO_INET,
        msg::NLM_F_CREATE | msg::NLM_F_APPEND,
        format!("adding rule `{text}` to chain {} of nftables table {table}", chain.name),
        |w| {
            w.put_str(NFTA_RULE_TABLE, table);
            w.put_str(NFTA_RULE_CHAIN, chain.name);
            let list = w.nest(NFTA_RULE_EXPRESSIONS);
            exprs(w);
            w.end_nest(list);
        },
    );
}

/// `meta mark == mark accept`.
pub(crate) fn add_mark_rule(b: &mut Batch, table: &str, chain: Chain, mark: u32) {
    add_rule(b, table, chain, &format!("meta mark {mark:#010x} accept"), |w| {
        meta_load(w, NFT_META_MARK, NFT_REG_1);
        // skb->mark is compared in host byte order.
        cmp_eq(w, NFT_REG_1, &mark.to_ne_bytes());
        verdict(w, NF_ACCEPT);
    });
}

fn log_to_group(w: &mut Writer, group: u16) {
    expr(w, "log", |w| {
        w.put(NFTA_LOG_GROUP, &group.to_be_bytes());
        w.put(NFTA_LOG_QTHRESHOLD, &1u16.to_be_bytes());
    });
}

/// Drops TCP packets of `family` whose 4-tuple is in the family's set. The
/// key is always (remote address, remote port, local address, local port):
/// source first on input, destination first on output. With `log_group`,
/// each dropped packet is first copied to that `nfnetlink_log` group.
pub(crate) fn add_conn_rule(b: &mut Batch, table: &str, chain: Chain, family: &Family, log_group: Option<u16>) {
    let ip = family.nft_name;
    let remote_is_source = chain.inbound;
    let remote = endpoint(family, remote_is_source);
    let local = endpoint(family, !remote_is_source);
    let log = log_group.map(|g| format!("log group {g} ")).unwrap_or_default();
    let text = format!(
        "{ip} {} . tcp {} . {ip} {} . tcp {} @{} {log}drop",
        remote.addr_name, remote.port_name, local.addr_name, local.port_name, family.set
    );
    add_rule(b, table, chain, &text, |w| {
        meta_load(w, NFT_META_NFPROTO, NFT_REG_1);
        cmp_eq(w, NFT_REG_1, &[family.nfproto]);
        meta_load(w, NFT_META_L4PROTO, NFT_REG_1);
        cmp_eq(w, NFT_REG_1, &[libc::IPPROTO_TCP as u8]);
        // Each component starts in a fresh 4-byte register; a 2-byte port
        // load zeroes the rest of its register.
        let mut reg = NFT_REG32_00;
        for ep in [&remote, &local] {
            payload_load(w, NFT_PAYLOAD_NETWORK_HEADER, ep.addr_offset, family.addr_len, reg);
            reg += family.addr_len / 4;
            payload_load(w, NFT_PAYLOAD_TRANSPORT_HEADER, ep.port_offset, 2, reg);
            reg += PORT_SLOT / 4;
        }
        lookup(w, family.set, NFT_REG32_00);
        if let Some(g) = log_group {
            log_to_group(w, g);
        }
        verdict(w, NF_DROP);
    });
}

/// Where one end's address and port are in a packet.
struct Endpoint {
    addr_offset: u32,
    port_offset: u32,
    addr_name: &'static str,
    port_name: &'static str,
}

fn endpoint(family: &Family, source: bool) -> Endpoint {
    if source {
        Endpoint { addr_offset: family.saddr_offset, port_offset: 0, addr_name: "saddr", port_name: "sport" }
    } else {
        Endpoint { addr_offset: family.daddr_offset, port_offset: 2, addr_name: "daddr", port_name: "dport" }
    }
}

/// Elements per `NFT_MSG_NEWSETELEM` message, so that its element list
/// stays under the 64 KiB attribute limit (a v6 element takes 52 bytes).
pub(crate) const ELEMS_PER_MSG: usize = 1000;

/// Adds the keys (each `family.key_len()` bytes, concatenated in `keys`) to
/// the family's set, `ELEMS_PER_MSG` per message. Existing keys are kept.
pub(crate) fn add_elements(b: &mut Batch, table: &str, family: &Family, keys: &[u8]) {
    let key_len = family.key_len() as usize;
    for chunk in keys.chunks(key_len * ELEMS_PER_MSG) {
        b.add(
            NFT_MSG_NEWSETELEM,
            NFPROTO_INET,
            msg::NLM_F_CREATE,
            format!("adding {} connections to set {} of nftables table {table}", chunk.len() / key_len, family.set),
            |w| {
                w.put_str(NFTA_SET_ELEM_LIST_TABLE, table);
                w.put_str(NFTA_SET_ELEM_LIST_SET, family.set);
                let list = w.nest(NFTA_SET_ELEM_LIST_ELEMENTS);
                for key in chunk.chunks(key_len) {
                    let elem = w.nest(NFTA_LIST_ELEM);
                    let k = w.nest(NFTA_SET_ELEM_KEY);
                    w.put(NFTA_DATA_VALUE, key);
                    w.end_nest(k);
                    w.end_nest(elem);
                }
                w.end_nest(list);
            },
        );
    }
}

/// Bytes one element adds to a `NFT_MSG_NEWSETELEM` message.
pub(crate) const fn element_size(family: &Family) -> usize {
    // list element + key nest + value attribute headers, then the key
    3 * 4 + family.key_len() as usize
}
