package main

// listen.go is the service's one LISTEN connection and its in-process
// fan-out: the relay waits on it for new outbox rows, and the Server-Sent
// Events of GET /orders/{id}/events wait on it for status changes applied by
// any replica. It also announces this process's new outbox rows to the
// others (announce).

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

type notifier struct {
	db       *pgxpool.Pool
	log      *slog.Logger
	channels []string
	// resync, given the payloads subscribed to on a channel when the
	// LISTEN connection was down, returns those whose subscribers must
	// re-read; nil wakes them all.
	resync func(ctx context.Context, channel string, payloads []string) ([]string, error)

	mu      sync.Mutex
	subs    map[subKey]map[chan struct{}]struct{}
	pending map[string]struct{} // channels announced, not yet notified
	kick    chan struct{}
	self    string // the payload of this process's announcements
}

// subKey is what a subscriber waits for: a channel, and a payload on it ("":
// any). Subscribers are kept by it, so that a notification costs the
// subscribers it wakes, not all of them.
type subKey struct{ channel, payload string }

// newNotifier listens on channels; resync may be nil (see notifier.resync).
func newNotifier(db *pgxpool.Pool, log *slog.Logger,
	resync func(ctx context.Context, channel string, payloads []string) ([]string, error), channels ...string) *notifier {
	return &notifier{db: db, log: log, resync: resync, channels: channels, subs: map[subKey]map[chan struct{}]struct{}{},
		pending: map[string]struct{}{}, kick: make(chan struct{}, 1), self: newUUID()}
}

// peerNotifyInterval is the most often announce sends a NOTIFY.
const peerNotifyInterval = 50 * time.Millisecond

// announce wakes the subscribers of channel: this process's at once, other
// processes' (other replicas) through a NOTIFY within peerNotifyInterval.
//
// The transactions that write outbox rows send no NOTIFY themselves: a
// notifying commit holds a cluster-wide lock through its WAL flush, so every
// order commit would wait for the one before it. The relay that needs waking
// is nearly always this process's own; the others need far fewer
// notifications than there are commits, and poll in any case.
func (n *notifier) announce(channel string) {
	n.signal(channel, "")
	n.mu.Lock()
	n.pending[channel] = struct{}{}
	n.mu.Unlock()
	select {
	case n.kick <- struct{}{}:
	default:
	}
}

// notifyPeers sends announce's notifications until ctx ends: the first at
// once, then at most one per peerNotifyInterval, whatever was announced
// meanwhile folded into it.
func (n *notifier) notifyPeers(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-n.kick:
		}
		n.mu.Lock()
		channels := slices.Collect(maps.Keys(n.pending))
		clear(n.pending)
		n.mu.Unlock()
		for _, ch := range channels {
			nctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			if err := notify(nctx, n.db, ch, n.self); err != nil && ctx.Err() == nil {
				// The other replicas poll: they are late, not stuck.
				n.log.WarnContext(ctx, "could not notify the other replicas", repeatsKey, "notify peers", "err", err)
			}
			cancel()
		}
		sleep(ctx, peerNotifyInterval)
	}
}

// subscribe returns a signal that fires after a matching notification. It
// holds at most one pending signal: a subscriber re-reads the state it cares
// about, so coalesced notifications lose nothing, and a slow subscriber never
// blocks the others.
func (n *notifier) subscribe(channel, payload string) (<-chan struct{}, func()) {
	k, c := subKey{channel, payload}, make(chan struct{}, 1)
	n.mu.Lock()
	if n.subs[k] == nil {
		n.subs[k] = map[chan struct{}]struct{}{}
	}
	n.subs[k][c] = struct{}{}
	n.mu.Unlock()
	return c, func() {
		n.mu.Lock()
		delete(n.subs[k], c)
		if len(n.subs[k]) == 0 {
			delete(n.subs, k)
		}
		n.mu.Unlock()
	}
}

// signal wakes the subscribers of payload on channel, and those of any
// payload on it.
func (n *notifier) signal(channel, payload string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	wake(n.subs[subKey{channel, payload}])
	if payload != "" {
		wake(n.subs[subKey{channel, ""}])
	}
}

func wake(subs map[chan struct{}]struct{}) {
	for c := range subs {
		select {
		case c <- struct{}{}:
		default:
		}
	}
}

// resyncAll follows a (re)connect, after which notifications sent while the
// connection was down are lost. Subscribers of any payload (the relay) are
// woken at once. Those of one payload each (the event streams, one order
// each) are asked about with one call of resync per channel, and only those
// it names are woken: a reconnect must not make every stream re-read at once.
func (n *notifier) resyncAll(ctx context.Context) {
	byChannel := map[string][]string{}
	n.mu.Lock()
	for k, subs := range n.subs {
		if k.payload == "" {
			wake(subs)
		} else {
			byChannel[k.channel] = append(byChannel[k.channel], k.payload)
		}
	}
	n.mu.Unlock()
	for channel, payloads := range byChannel {
		var err error
		if n.resync != nil {
			rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			var changed []string
			changed, err = n.resync(rctx, channel, payloads)
			cancel()
			if err == nil {
				payloads = changed
			} else if ctx.Err() == nil {
				n.log.WarnContext(ctx, "listen: could not tell which streams missed a change; waking them all", "err", err)
			}
		}
		for i, p := range payloads {
			if err != nil && i > 0 && i%100 == 0 {
				sleep(ctx, 10*time.Millisecond) // all of them, but spread: 10 000 over a second
			}
			n.signal(channel, p)
		}
	}
}

// run keeps the LISTEN connection up until ctx ends, reconnecting with
// backoff. Notifications sent while it was down are lost, so every
// (re)connect resyncs the subscribers (resyncAll). The backoff counts failures
// in a row: a connection that was up starts the count again, so drops spread
// over a process's life each reconnect at once.
func (n *notifier) run(ctx context.Context) {
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() { n.notifyPeers(ctx) })
	for ctx.Err() == nil {
		retry(ctx, func(ctx context.Context) error { //nolint:errcheck // every failure is logged below
			listened, err := n.listen(ctx)
			if listened && ctx.Err() == nil {
				n.log.WarnContext(ctx, "listen connection lost, reconnecting", "err", err)
				return nil // a new count of failures
			}
			return err
		}, func(err error, wait time.Duration) bool {
			n.log.WarnContext(ctx, "listen connection failed, reconnecting", repeatsKey, "listen connection failed", "err", err, "retry_in", wait)
			return true
		})
	}
}

// listenApplicationName names the LISTEN connection in pg_stat_activity.
const listenApplicationName = "order-service listen"

// listen holds one LISTEN connection until it fails; listened says whether
// it got as far as listening.
func (n *notifier) listen(ctx context.Context) (listened bool, err error) {
	pc, err := n.db.Acquire(ctx)
	if err != nil {
		return false, fmt.Errorf("acquire listen connection: %w", err)
	}
	// Hijacked, the connection is ours: the pool will neither hand it to
	// a request nor close it as idle.
	conn := pc.Hijack()
	defer conn.Close(context.WithoutCancel(ctx))

	if _, err := conn.Exec(ctx, "SET application_name = '"+listenApplicationName+"'"); err != nil {
		return false, fmt.Errorf("name listen connection: %w", err)
	}
	for _, ch := range n.channels {
		if _, err := conn.Exec(ctx, "LISTEN "+pgx.Identifier{ch}.Sanitize()); err != nil {
			return false, fmt.Errorf("listen %s: %w", ch, err)
		}
	}
	n.resyncAll(ctx)
	for {
		wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		msg, err := conn.WaitForNotification(wctx)
		cancel()
		switch {
		case err == nil && msg.Payload == n.self:
			// This process's own announcement: its subscribers were
			// woken when it was made.
		case err == nil:
			n.signal(msg.Channel, msg.Payload)
		case ctx.Err() != nil:
			return true, ctx.Err()
		case errors.Is(err, context.DeadlineExceeded):
			// Quiet for a while: make sure the connection still lives,
			// since a dead one would wait forever.
			pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			err = conn.Ping(pctx)
			cancel()
			if err != nil {
				return true, fmt.Errorf("ping listen connection: %w", err)
			}
		default:
			return true, fmt.Errorf("wait for notification: %w", err)
		}
	}
}
