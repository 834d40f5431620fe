/* sockops: when a captured connection is established, file the original destination
 * under the app socket's 4-tuple (for getsockopt) and put both sockets in sock_hash (for
 * redirect) when its shortcut mode lets them in. Only sockets of captured connections go
 * in: they are the only ones that will receive redirected data. */
#include "helpers.h"

static __always_inline int port_listed(const struct shortcut_policy *p, __u16 port)
{
#pragma unroll
	for (int i = 0; i < MA_MAX_SHORTCUT_EXCLUDE; i++)
		if (i < p->n_ports && p->ports[i] == port)
			return 1;
	return 0;
}

/* Does the pod at this address keep its sidecar<->sidecar connections on app_port off
 * the shortcut (meshaccel.io/shortcut: "none", or the port excluded)? For a server app
 * that may stop reading: on the shortcut nothing slows its caller's sidecar down. */
static __always_inline int sidecar_hop_kept_off(const __u32 *ip, __u16 app_port)
{
	struct pod_config *pod = pod_config.lookup((struct ip_key *)ip);
	struct shortcut_policy *p;
	__u64 cookie;

	if (!pod)
		return 0;
	cookie = pod->netns_cookie;
	p = pod_shortcut.lookup(&cookie);
	return p && (p->apps == MA_POD_APPS_NONE || port_listed(p, app_port));
}

/* May this socket join sock_hash? Loopback tuples (they carry the pod's netns cookie)
 * have an app at one end: they join if the node's mode or the pod's own setting lets
 * apps in and the app port is not excluded. Sidecar<->sidecar ones join unless the pod
 * at either end keeps them off. */
static __always_inline int allowed(const struct sock_key *key, __u16 app_port, __u32 mode)
{
	__u64 cookie = key->netns_cookie;
	struct shortcut_policy *p;
	int apps = mode == MA_SHORTCUT_ALL;

	if (!cookie) {
		if (sidecar_hop_kept_off(key->local_ip, app_port) ||
		    sidecar_hop_kept_off(key->remote_ip, app_port))
			goto kept_off_by_pod;
		return 1;
	}
	p = pod_shortcut.lookup(&cookie);
	if (p) {
		if (p->apps == MA_POD_APPS_OFF || p->apps == MA_POD_APPS_NONE)
			goto kept_off_by_pod;
		if (p->apps == MA_POD_APPS_ON)
			apps = 1;
	}
	if (!apps) {
		count(CNT_SOCK_KEPT_OFF_APP, 1);
		return 0;
	}
	if (p && port_listed(p, app_port))
		goto kept_off_by_pod;
	return 1;
kept_off_by_pod:
	count(CNT_SOCK_KEPT_OFF_BY_POD, 1);
	return 0;
}

/* Both ends of a captured connection: ask for BPF_SOCK_OPS_STATE_CB, so the
 * per-connection entries go when it closes, and join sock_hash if allowed. */
static __always_inline void track(struct bpf_sock_ops *skops, struct sock_key *key,
				  __u16 app_port)
{
	struct ma_config *cfg = config();

	bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
	if (!cfg || cfg->shortcut == MA_SHORTCUT_OFF || !allowed(key, app_port, cfg->shortcut))
		return;
	/* (bcc rewrites map methods only as whole statements, hence the local) */
	long err = sock_hash.sock_hash_update(skops, key, BPF_ANY);

	if (err) {
		count(CNT_SOCK_INSERT_FAILED, 1);
		return;
	}
	count(CNT_SOCK_INSERTED, 1);
}

/* A sidecar's call to a pod on this node whose istio-init REDIRECT sends it to the pod's
 * inbound port: the caller's end sees podIP:9080, the callee's podIP:15006, two 4-tuples.
 * The caller's original destination is filed under the second one too (its NAT alias), so
 * that the callee's end finds it (sockops, getsockopt), and nat_peer then tells each end's
 * sk_msg the other's key. If the NAT also moved the caller's port (its reply tuple was
 * taken by an older connection), the callee's end finds nothing: SO_ORIGINAL_DST is then
 * conntrack's (right) answer and the bytes go TCP. */
static __always_inline int nat_alias(const struct sock_key *key, struct sock_key *alias)
{
	struct pod_config *dst;

	if (key->netns_cookie) /* only tuples of two pod addresses cross a pod's NAT */
		return 0;
	dst = pod_config.lookup((struct ip_key *)key->remote_ip);
	if (!dst || dst->inbound_port == key->remote_port)
		return 0;
	*alias = *key;
	alias->remote_port = dst->inbound_port;
	return 1;
}

/* The app's side: connect() completed; was it one connect4/6 captured? */
static __always_inline void active_established(struct bpf_sock_ops *skops)
{
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct orig_dst *found = orig_dst_by_cookie.lookup(&cookie);
	struct orig_dst od;
	struct sock_key key = {};
	struct sock_key alias = {};

	if (!found)
		return;
	od = *found;
	orig_dst_by_cookie.delete(&cookie);
	SOCK_KEY_FROM_CTX(&key, skops);
	long err = orig_dst_by_sock.update(&key, &od);

	if (err) {
		count(CNT_CONNECT_RECORD_FAILED, 1);
		return;
	}
	if (nat_alias(&key, &alias))
		orig_dst_by_sock.insert(&alias, &od); /* (an older entry there: left alone) */
	track(skops, &key, od.port);
}

/* The sidecar's side: accepted a connection; is its peer a captured app socket? */
static __always_inline void passive_established(struct bpf_sock_ops *skops)
{
	struct sock_key key = {};
	struct sock_key peer = {};
	struct sock_key caller;
	struct orig_dst *od;

	SOCK_KEY_FROM_CTX(&key, skops);
	peer_key(&key, &peer);
	od = orig_dst_by_sock.lookup(&peer);
	if (!od)
		return;
	if (!key.netns_cookie && od->port != key.local_port) {
		/* found through the caller's NAT alias: the caller's end is under peer, but
		 * with the port it called */
		caller = peer;
		caller.remote_port = od->port;
		nat_peer.update(&key, &caller);
		nat_peer.update(&caller, &key);
	}
	track(skops, &key, od->port);
}

static __always_inline void closed(struct bpf_sock_ops *skops)
{
	struct sock_key key = {};
	struct sock_key peer = {};
	struct orig_dst *od;

	SOCK_KEY_FROM_CTX(&key, skops);
	fell_back.delete(&key);
	nat_peer.delete(&key);
	/* The original destination goes when the sidecar's end closes, not the app's: an
	 * app may connect, send and close before the sidecar even accepted (conntrack keeps
	 * its entry that long too). On the app's end this deletes nothing. */
	peer_key(&key, &peer);
	od = orig_dst_by_sock.lookup(&peer);
	if (od && !key.netns_cookie) {
		/* the callee's end of a sidecar's call: the caller's entry under the tuple it
		 * called and under its NAT alias (found through either) */
		struct sock_key called = peer;
		struct sock_key alias;

		called.remote_port = od->port;
		if (nat_alias(&called, &alias))
			orig_dst_by_sock.delete(&alias);
		orig_dst_by_sock.delete(&called);
	}
	orig_dst_by_sock.delete(&peer);
}

/* A captured connect() is under way: hear if it closes before it is established (refused:
 * no sidecar listening, as during a sidecar restart), so that its original destination
 * leaves orig_dst_by_cookie at once instead of crowding out connects still in flight. */
static __always_inline void connecting(struct bpf_sock_ops *skops)
{
	__u64 cookie = bpf_get_socket_cookie(skops);

	if (orig_dst_by_cookie.lookup(&cookie))
		bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
}

static __always_inline void never_established(struct bpf_sock_ops *skops)
{
	__u64 cookie = bpf_get_socket_cookie(skops);

	orig_dst_by_cookie.delete(&cookie);
}

/* A socket of a registered pod starts listening: if on the pod's inbound port, it is the
 * sidecar's inbound listener, which sk_lookup hands captured inbound connections to. */
static __always_inline void listening(struct bpf_sock_ops *skops)
{
	__u64 cookie = bpf_get_netns_cookie(skops);
	struct ip_key *pod_ip = pod_by_netns.lookup(&cookie);
	struct pod_config *pod = pod_ip ? pod_config.lookup(pod_ip) : 0;
	struct ip_key key;

	if (!pod || skops->local_port != pod->inbound_port)
		return;
	/* an AF_INET6 listener may also take IPv4 (unless v6only): the pod's IPv4 address
	 * gets it only when no AF_INET listener claims that address */
	if (skops->family == MA_AF_INET6) {
		key = pod->ips[1];
		if (key.ip[0] | key.ip[1] | key.ip[2] | key.ip[3])
			inbound_listener.sock_hash_update(skops, &key, BPF_ANY);
	}
	key = pod->ips[0];
	if (key.ip[2]) /* the pod has an IPv4 address (v4-mapped: ::ffff:a.b.c.d) */
		inbound_listener.sock_hash_update(skops, &key,
						  skops->family == MA_AF_INET ? BPF_ANY : BPF_NOEXIST);
}

int ma_sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		active_established(skops);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		passive_established(skops);
		break;
	case BPF_SOCK_OPS_TCP_LISTEN_CB:
		listening(skops);
		break;
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		connecting(skops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] != BPF_TCP_CLOSE)
			break;
		if (skops->args[0] == BPF_TCP_SYN_SENT)
			never_established(skops);
		else
			closed(skops);
		break;
	}
	return 1;
}
