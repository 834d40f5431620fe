/* Structs and enums shared by the eBPF programs and Python (meshaccel/maps.py mirrors
 * them; tests/kernel/test_layout.py checks the mirror against what bcc compiled).
 * Keep this the only place these layouts are written down in C.
 *
 * Addresses are always 16 bytes: IPv4 is stored IPv4-mapped (::ffff:a.b.c.d), so one
 * key type serves AF_INET sockets, AF_INET6 sockets and v4-mapped AF_INET6 sockets.
 * Ports are host byte order everywhere in these structs.
 */
#ifndef MESHACCEL_TYPES_H
#define MESHACCEL_TYPES_H

/* One end of a TCP connection as seen by a socket: its local and remote address, plus
 * the netns cookie, because every pod has its own 127.0.0.1 and 4-tuples repeat. */
struct sock_key {
	__u64 netns_cookie;
	__u32 local_ip[4];
	__u32 remote_ip[4];
	__u16 local_port;
	__u16 remote_port;
	__u32 _pad;
};

/* Where the app wanted to go before connect() was rewritten to the sidecar. */
struct orig_dst {
	__u32 ip[4];
	__u16 port;
	__u16 family; /* AF_INET or AF_INET6: what SO_ORIGINAL_DST answers with */
	__u32 _pad;
};

/* Datapath settings written by the loader into config_map[0]. */
struct ma_config {
	__u32 proxy_uid;   /* connect() from this uid is the sidecar's own: never captured */
	__u16 proxy_port;  /* outbound port the sidecar listens on (istio-iptables -p) */
	__u8 shortcut;     /* 1: captured connections' sockets go in sock_hash (sk_msg path) */
	__u8 _pad;
};

/* Which cgroup the programs are attached to, so that status and detach need not be told.
 * Written by the loader into attach_info_map[0]; no program reads it. */
struct attach_info {
	__u64 cgroup_id;       /* inode number of the cgroup directory */
	char cgroup_path[248]; /* NUL-terminated */
};

/* Index into the per-CPU counters array. Python reads them under these names in
 * lower case (enum name minus the CNT_ prefix); keep CNT__MAX last. */
enum counter {
	CNT_CONNECT_CAPTURED = 0,        /* connect() rewritten to the sidecar */
	CNT_CONNECT_SKIPPED_PROXY_UID,   /* connect() by the sidecar itself */
	CNT_CONNECT_SKIPPED_LOOPBACK,    /* destination already on loopback */
	CNT_CONNECT_SKIPPED_NOT_TCP,     /* UDP and other non-stream sockets */
	CNT_CONNECT_RECORD_FAILED,       /* could not remember the original destination: not captured */
	CNT_ORIG_DST_ANSWERED,           /* SO_ORIGINAL_DST answered from the map */
	CNT_ORIG_DST_NOT_FOUND,          /* SO_ORIGINAL_DST asked for a connection we did not capture */
	CNT_SOCK_INSERTED,               /* sockets added to the sockhash */
	CNT_SOCK_INSERT_FAILED,          /* sockhash update refused (full, or socket state) */
	CNT_MSG_REDIRECTED,              /* sendmsg() handed straight to the peer socket */
	CNT_MSG_REDIRECTED_BYTES,
	CNT_MSG_FALLBACK_NO_PEER,        /* peer socket not in the sockhash: normal TCP path */
	CNT_MSG_FALLBACK_BYTES,
	CNT__MAX,
};

#endif /* MESHACCEL_TYPES_H */
