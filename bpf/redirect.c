/* sk_msg on sock_hash: hand each sendmsg() of a captured app<->sidecar socket straight to
 * the peer socket's receive side, skipping the loopback TCP/IP stack. Whatever can't be
 * redirected goes the normal way (SK_PASS without a redirect target). */
#include "helpers.h"

int ma_redirect(struct sk_msg_md *msg)
{
	struct sock_key self = {};
	struct sock_key peer = {};
	__u8 one = 1;

	SOCK_KEY_FROM_CTX(&self, msg);

	/* fell back before: the socket's own mark, else (its allocation failed) the record */
	void *mark = fell_back_sk.sk_storage_get(msg->sk, 0, 0);

	if (mark || fell_back.lookup(&self)) {
		count(CNT_MSG_FALLBACK_NO_PEER, 1);
		count(CNT_MSG_FALLBACK_BYTES, msg->size);
		return SK_PASS;
	}

	/* the peer is the same connection seen from the other end, in the same netns */
	peer_key(&self, &peer);
	long verdict = sock_hash.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);

	if (verdict != SK_PASS && !self.netns_cookie) {
		/* sidecar to sidecar through the callee pod's NAT: the other end's own key */
		struct sock_key *other = nat_peer.lookup(&self);

		if (other)
			verdict = sock_hash.msg_redirect_hash(msg, other, BPF_F_INGRESS);
	}

	if (verdict == SK_PASS) {
		count(CNT_MSG_REDIRECTED, 1);
		count(CNT_MSG_REDIRECTED_BYTES, msg->size);
		return SK_PASS;
	}
	/* peer not (yet) in sock_hash, e.g. the sidecar's end is still completing the
	 * handshake: this and every later message of this socket take the TCP path */
	fell_back_sk.sk_storage_get(msg->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	fell_back.update(&self, &one);
	count(CNT_MSG_FALLBACK_NO_PEER, 1);
	count(CNT_MSG_FALLBACK_BYTES, msg->size);
	return SK_PASS;
}
