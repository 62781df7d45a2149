package main

// streams.go is GET /orders/{id}/events: an order's status as Server-Sent
// Events, and the limits that keep streams a bounded resource. A stream holds
// a connection, a file descriptor and a goroutine for as long as its client
// stays, so their number is capped (in all, and per user), each lives at most
// STREAM_MAX_LIFETIME, and a client that stops reading is dropped when a write
// to it stalls.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// streamWriteTimeout is how long one event may take to leave: a client that
// reads nothing fills the socket's buffers, and its next write fails after
// this. A variable so that a test need not wait 10s.
var streamWriteTimeout = 10 * time.Second

const (
	// streamKeepAlive keeps proxies from timing a quiet stream out.
	streamKeepAlive = 15 * time.Second
	// streamRetryAfter is what a refused client is asked to wait.
	streamRetryAfter = "5"
)

// streamLimits counts open streams against a global and a per-user cap.
type streamLimits struct {
	max, perUser int
	lifetime     time.Duration

	mu     sync.Mutex
	open   int
	byUser map[string]int

	refusedUser, refusedAll atomic.Int64
}

func newStreamLimits(max, perUser int, lifetime time.Duration) *streamLimits {
	return &streamLimits{max: max, perUser: perUser, lifetime: lifetime, byUser: map[string]int{}}
}

// acquire takes a stream for user; a refusal is the status to answer: 429
// when the user holds their share, 503 when the service holds all it may.
func (l *streamLimits) acquire(user string) (release func(), refusal int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	switch {
	case l.byUser[user] >= l.perUser:
		l.refusedUser.Add(1)
		return nil, http.StatusTooManyRequests
	case l.open >= l.max:
		l.refusedAll.Add(1)
		return nil, http.StatusServiceUnavailable
	}
	l.open++
	l.byUser[user]++
	var once sync.Once
	return func() {
		once.Do(func() {
			l.mu.Lock()
			defer l.mu.Unlock()
			l.open--
			if l.byUser[user]--; l.byUser[user] == 0 {
				delete(l.byUser, user)
			}
		})
	}, 0
}

// gauges are the streams open, the cap, and the refusals, for /metrics.
func (l *streamLimits) gauges() streamGauges {
	return streamGauges{open: l.opened(), max: l.max, refusedUser: l.refusedUser.Load(), refusedAll: l.refusedAll.Load()}
}

func (l *streamLimits) opened() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.open
}

// handleOrderEvents streams an order's status: the current state at once,
// then each change, ending after PAID or FAILED. The change may be applied by
// any replica: it arrives through the NOTIFY that applyPaymentResults sends.
//
// Each event's id is the status it carries. A browser's EventSource
// reconnects after a stream ends and sends the last id it saw: when that is
// already the order's final status there is nothing more to say, and 204
// tells the EventSource to stop. A first request for a finished order gets
// its final event, so a client always learns the state.
func handleOrderEvents(log *slog.Logger, db *pgxpool.Pool, notes *notifier, limits *streamLimits,
	stop <-chan struct{}) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		userID, id, ok := requireUserAndOrderID(w, r)
		if !ok {
			return
		}
		release, refusal := limits.acquire(userID)
		if refusal != 0 {
			refuseStream(w, refusal)
			return
		}
		defer release()
		// Subscribe before the first read, so that a change committed in
		// between still wakes us.
		changed, unsubscribe := notes.subscribe(statusChannel, id)
		defer unsubscribe()
		read := func() (Order, error) {
			ctx, cancel := context.WithTimeout(r.Context(), requestDBTimeout)
			defer cancel()
			return getOrder(ctx, db, userID, id)
		}
		order, err := read()
		switch {
		case errors.Is(err, errNotFound):
			writeProblem(w, http.StatusNotFound, "no order "+id)
		case err != nil:
			writeDBError(w, r, log, err)
		case order.Status != "PENDING" && r.Header.Get("Last-Event-ID") == order.Status:
			w.WriteHeader(http.StatusNoContent)
		default:
			s := startEventStream(w)
			if err := s.follow(r.Context(), order, read, changed, stop, limits.lifetime); err != nil {
				log.WarnContext(r.Context(), "order events: read failed", repeatsKey, "order events: read failed",
					"order_id", id, "err", err)
			}
		}
	})
}

// refuseStream answers a stream past a cap: 429 for the user's, 503 for the
// service's. The connection is closed after the answer: a client that never
// reads must not keep a descriptor as an idle connection.
func refuseStream(w http.ResponseWriter, refusal int) {
	w.Header().Set("Connection", "close")
	w.Header().Set("Retry-After", streamRetryAfter)
	detail := "too many open event streams for this user; close one, or retry later"
	if refusal == http.StatusServiceUnavailable {
		detail = "the service holds as many event streams as it may; retry later"
	}
	writeProblem(w, refusal, detail)
}

// eventStream writes Server-Sent Events, each within streamWriteTimeout.
type eventStream struct {
	w  http.ResponseWriter
	rc *http.ResponseController
}

// startEventStream answers 200 with the stream's headers. The request has no
// body left to read: the server's ReadTimeout must not end the stream.
func startEventStream(w http.ResponseWriter) *eventStream {
	s := &eventStream{w: w, rc: http.NewResponseController(w)}
	_ = s.rc.SetReadDeadline(time.Time{})
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.Header().Set("X-Accel-Buffering", "no") // proxies must not buffer the stream
	w.WriteHeader(http.StatusOK)
	return s
}

// follow sends order, then each change that read finds after changed fires,
// until a final status, the client leaves, stop closes (shutdown), lifetime
// ends, or a write stalls. The error is a failed read, after which the client
// is told to reconnect.
func (s *eventStream) follow(ctx context.Context, order Order, read func() (Order, error), changed <-chan struct{},
	stop <-chan struct{}, lifetime time.Duration) error {
	keepAlive := time.NewTicker(streamKeepAlive)
	defer keepAlive.Stop()
	// Jittered, so that streams opened together do not all end and
	// reconnect together.
	end := time.NewTimer(jitter(lifetime - lifetime/10))
	defer end.Stop()
	sent := ""
	for {
		if order.Status != sent {
			b, _ := json.Marshal(order)
			if !s.send("id: %s\nevent: status\ndata: %s\n\n", order.Status, b) {
				return nil
			}
			sent = order.Status
		}
		if order.Status != "PENDING" {
			return nil
		}
		select {
		case <-ctx.Done():
			return nil
		case <-stop:
			return nil
		case <-end.C:
			// The client reconnects, with Last-Event-ID, and gets a
			// stream of a new lifetime.
			s.send(": the stream's lifetime is over; reconnect\n\n")
			return nil
		case <-keepAlive.C:
			// A comment line: keeps proxies from timing the stream out
			// and finds clients that are gone.
			if !s.send(": keep-alive\n\n") {
				return nil
			}
			continue
		case <-changed:
		}
		var err error
		if order, err = read(); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			s.send("event: error\ndata: {\"detail\": \"status unavailable; reconnect to resume\"}\n\n")
			return err
		}
	}
}

// send writes and flushes one event; false means the client is gone or has
// stopped reading.
func (s *eventStream) send(format string, args ...any) bool {
	_ = s.rc.SetWriteDeadline(time.Now().Add(streamWriteTimeout))
	if _, err := fmt.Fprintf(s.w, format, args...); err != nil {
		return false
	}
	return s.rc.Flush() == nil
}
