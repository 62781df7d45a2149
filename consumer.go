package main

// consumer.go applies payment-results to orders, each exactly once, and sends
// records it can never apply to the dead-letter topic.

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
)

// paymentResultFields are paymentResult's fields, exactly as they are spelled.
var paymentResultFields = []string{"order_id", "status", "reason"}

// errPoison marks a record that no retry can apply.
var errPoison = errors.New("poison record")

// errUnknownOrder marks a result for an order this service does not have.
var errUnknownOrder = errors.New("unknown order")

// dlqReason classes why a record went to the DLQ, for its metric.
func dlqReason(cause error) string {
	switch {
	case errors.Is(cause, errUnknownOrder):
		return "unknown_order"
	case dbPermanent(cause):
		return "refused"
	}
	return "invalid"
}

// maxReason is how many characters of a FAILED result's reason are kept,
// like an order's description.
const maxReason = 1000

// decodePaymentResult validates a payment-results value. The reason is free
// text for people, so it is cleaned rather than refused: a NUL (which
// PostgreSQL text cannot hold) becomes U+FFFD, as invalid UTF-8 already does
// in encoding/json, and it is cut to maxReason characters. The status change
// is what matters, and it is not lost for the sake of its comment.
func decodePaymentResult(b []byte) (paymentResult, error) {
	var p paymentResult
	if err := json.Unmarshal(b, &p); err != nil {
		return p, fmt.Errorf("%w: malformed JSON: %s", errPoison, clip(err.Error(), 200))
	}
	// A duplicate or a wrongly cased key would make us read another value
	// than a validator of the contract reads: the sender's fault.
	if err := checkKeys(b, paymentResultFields); err != nil {
		return p, fmt.Errorf("%w: %w", errPoison, err)
	}
	p.OrderID = strings.ToLower(p.OrderID)
	if !isUUID(p.OrderID) {
		return p, fmt.Errorf("%w: order_id %q is not a UUID", errPoison, clip(p.OrderID, 64))
	}
	if p.Status != "PAID" && p.Status != "FAILED" {
		return p, fmt.Errorf("%w: unknown status %q", errPoison, clip(p.Status, 64))
	}
	if p.Status == "PAID" {
		p.Reason = nil
	}
	if p.Reason != nil {
		r := strings.ReplaceAll(*p.Reason, "\x00", "\uFFFD")
		if utf8.RuneCountInString(r) > maxReason {
			r = string([]rune(r)[:maxReason])
		}
		p.Reason = &r
	}
	return p, nil
}

type consumer struct {
	db       *pgxpool.Pool
	group    *kgo.Client // consumes payment-results in the service's group
	producer *kgo.Client // writes the dead-letter topic
	dlqTopic string
	log      *slog.Logger
	metrics  *metrics
	// rebalanceWanted holds a token while a rebalance of the group waits
	// for the poll in hand (kgo's OnPartitionsCallbackBlocked).
	rebalanceWanted chan struct{}
}

// newConsumer configures the group member. Offsets are committed only for
// marked records, and a record is marked only after the transaction that
// applied it has committed: a crash in between redelivers the record, and the
// conditional UPDATE makes that redelivery a no-op.
func newConsumer(brokers []string, cfg config, log *slog.Logger, db *pgxpool.Pool, producer *kgo.Client, m *metrics) (*consumer, error) {
	c := &consumer{db: db, producer: producer, dlqTopic: cfg.topic(topicPaymentDLQ), log: log, metrics: m,
		rebalanceWanted: make(chan struct{}, 1)}
	opts := append([]kgo.Opt{
		kgo.SeedBrokers(brokers...),
		kgo.ClientID("order-service"),
		kgo.ConsumerGroup(cfg.topic(consumerGroup)),
		kgo.ConsumeTopics(cfg.topic(topicPaymentResults)),
		// Classic protocol: a member that crashed holds its partitions
		// until this timeout, and a restarted replica waits that long for
		// them unless it has a static identity (KIP-345). Under KIP-848
		// the broker keeps the session, as the group's configs say:
		// setGroupSession sets them.
		kgo.SessionTimeout(cfg.SessionTimeout),
		kgo.HeartbeatInterval(groupHeartbeat(cfg.SessionTimeout)),
		// How long the group waits for a member to give partitions up or
		// rejoin; a member that does not is dropped. A failing poll is
		// given back as soon as a rebalance waits for it (consumer.retryStep).
		kgo.RebalanceTimeout(cfg.RebalanceTimeout),
		// A fetch waits at most this long for records before the broker
		// answers empty. Partitions assigned meanwhile (a replica died)
		// are fetched from the next request on: at kgo's 5 s they waited
		// up to 5 s more; an idle replica now asks twice a second.
		kgo.FetchMaxWait(500 * time.Millisecond),
		kgo.AutoCommitMarks(),
		// Polls and rebalances exclude each other, so a commit never
		// crosses a rebalance; run calls AllowRebalance after each poll.
		kgo.BlockRebalanceOnPoll(),
	}, c.partitionCallbacks()...)
	if cfg.GroupProtocol == groupProtocolConsumer {
		// KIP-848: the coordinator assigns partitions and moves them one
		// member at a time; no member waits for another, so a member
		// that died stalls only its own partitions, never the group.
		// kgo uses it with a sticky or range balancer first; on a broker
		// without it (before Kafka 4.0) kgo falls back to the classic
		// protocol, where a group of such members agrees on the eager
		// sticky assignor, and a member of an older release still
		// offering only cooperative-sticky keeps the group on that.
		opts = append(opts, kgo.ServerSideBalancer(),
			kgo.Balancers(kgo.StickyBalancer(), kgo.CooperativeStickyBalancer()))
	}
	if cfg.InstanceID != "" {
		opts = append(opts, kgo.InstanceID(cfg.InstanceID))
	}
	var err error
	c.group, err = kgo.NewClient(opts...)
	return c, err
}

// consumerLag is the group's lag on topic per partition: the log end less the
// committed offset (the whole partition when nothing is committed yet). It
// reads offsets only, never the group's description, which each protocol
// answers through an API of its own.
func consumerLag(ctx context.Context, cl *kgo.Client, group, topic string) (map[int32]int64, error) {
	adm := kadm.NewClient(cl)
	committed, err := adm.FetchOffsets(ctx, group)
	if err == nil {
		err = committed.Error()
	}
	if err != nil {
		return nil, fmt.Errorf("consumer lag: committed offsets: %w", err)
	}
	ends, err := adm.ListEndOffsets(ctx, topic)
	if err == nil {
		err = ends.Error()
	}
	if err != nil {
		return nil, fmt.Errorf("consumer lag: end offsets: %w", err)
	}
	starts, err := adm.ListStartOffsets(ctx, topic)
	if err == nil {
		err = starts.Error()
	}
	if err != nil {
		return nil, fmt.Errorf("consumer lag: start offsets: %w", err)
	}
	out := map[int32]int64{}
	ends.Each(func(end kadm.ListedOffset) {
		from := int64(0)
		if start, ok := starts.Lookup(topic, end.Partition); ok {
			from = start.Offset
		}
		if c, ok := committed.Lookup(topic, end.Partition); ok && c.At >= 0 {
			from = c.At
		}
		out[end.Partition] = max(0, end.Offset-from)
	})
	return out, nil
}

// partitionCallbacks keep this replica's share of payment-results counted
// (payment_results_partitions_owned and its changes), commit what it applied
// before a partition is handed over, and signal a rebalance that waits for
// the poll in hand.
func (c *consumer) partitionCallbacks() []kgo.Opt {
	m, log := c.metrics, c.log
	owned := &m.partitionsOwned
	count := func(ps map[string][]int32) (n int64) {
		for _, p := range ps {
			n += int64(len(p))
		}
		return n
	}
	return []kgo.Opt{
		kgo.OnPartitionsAssigned(func(_ context.Context, _ *kgo.Client, ps map[string][]int32) {
			owned.Add(count(ps))
			m.partitionChanges[partitionsAssigned].Add(count(ps))
		}),
		kgo.OnPartitionsRevoked(func(ctx context.Context, cl *kgo.Client, ps map[string][]int32) {
			owned.Add(-count(ps))
			m.partitionChanges[partitionsRevoked].Add(count(ps))
			// The new owner starts from what we commit here. Bounded: a
			// group that is rebalancing again may never answer, and
			// leaving the group (shutdown) waits for this callback.
			ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			if err := cl.CommitMarkedOffsets(ctx); err != nil {
				log.WarnContext(ctx, "consumer: commit on revoke failed", "err", err)
			}
		}),
		// No commit when partitions are lost: they are someone else's
		// already and a commit would fail or rewind theirs.
		kgo.OnPartitionsLost(func(_ context.Context, _ *kgo.Client, ps map[string][]int32) {
			owned.Add(-count(ps))
			m.partitionChanges[partitionsLost].Add(count(ps))
		}),
		// A rebalance waits for the poll in hand: see consumer.retryStep.
		kgo.OnPartitionsCallbackBlocked(func(context.Context, *kgo.Client) {
			select {
			case c.rebalanceWanted <- struct{}{}:
			default:
			}
		}),
	}
}

// run consumes until ctx is cancelled, then commits what it applied, unless
// abort ends first: what it did not commit is redelivered, and changes nothing.
func (c *consumer) run(ctx, abort context.Context) {
	defer func() {
		cctx, cancel := context.WithTimeout(abort, 5*time.Second)
		defer cancel()
		if err := c.group.CommitMarkedOffsets(cctx); err != nil {
			c.log.WarnContext(ctx, "consumer: final commit failed", "err", err)
		}
	}()
	for {
		next := c.consume(ctx, c.group.PollRecords(ctx, 1000))
		// The one place a poll ends: a rebalance waits for nothing else.
		c.allowRebalance()
		switch next {
		case pollStop:
			return
		case pollAgainLater:
			sleep(ctx, time.Second)
		}
	}
}

// What run does after a poll, once the rebalance it held may go on.
const (
	pollNext       = iota // poll again
	pollAgainLater        // the poll was given back: poll again in a moment
	pollStop              // shutdown
)

// consume applies one poll and commits it. A poll that failed while a
// rebalance waited is given back (rewound), to be fetched again by whoever
// owns its partitions next.
func (c *consumer) consume(ctx context.Context, fetches kgo.Fetches) (next int) {
	if fetches.IsClientClosed() || ctx.Err() != nil {
		return pollStop
	}
	fetches.EachError(func(topic string, p int32, err error) {
		c.log.WarnContext(ctx, "consumer: fetch error", repeatsKey, "consumer: fetch error", "topic", topic, "partition", p, "err", err)
	})
	recs := fetches.Records()
	if len(recs) == 0 {
		return pollNext
	}
	err := c.processPoll(ctx, recs)
	if errors.Is(err, errPollReleased) {
		c.rewind(recs)
		return pollAgainLater
	}
	if err != nil {
		// Only shutdown stops processing; the poll stays unmarked and is
		// redelivered to the next owner.
		return pollStop
	}
	c.group.MarkCommitRecords(recs...)
	// Commit now rather than at the next autocommit tick: the smaller the
	// window, the fewer redeliveries after a crash.
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := c.group.CommitMarkedOffsets(cctx); err != nil && ctx.Err() == nil {
		c.log.WarnContext(ctx, "consumer: commit failed; autocommit will retry", "err", err)
	}
	return pollNext
}

// allowRebalance lets a rebalance waiting for the poll go on; a signal that
// it waited (rebalanceWanted) is then stale.
func (c *consumer) allowRebalance() {
	c.group.AllowRebalance()
	select {
	case <-c.rebalanceWanted:
	default:
	}
}

// processPoll applies the records of one poll, then sends the ones that can
// never apply to the DLQ. Transient failures (database down, DLQ unwritable)
// are retried until they succeed or ctx ends: skipping would lose records.
// Only shutdown makes it return an error.
func (c *consumer) processPoll(ctx context.Context, recs []*kgo.Record) error {
	var poison []dead
	var pending []item
	for _, rec := range recs {
		res, err := decodePaymentResult(rec.Value)
		if err != nil {
			poison = append(poison, dead{rec, err})
			continue
		}
		pending = append(pending, item{rec, res})
	}
	// Each round applies at most one result per order, in log order
	// (UPDATE ... FROM would apply an arbitrary one of two), so a later
	// result for an order meets the state the earlier one left. A poll
	// without repeats is one round.
	for len(pending) > 0 {
		var round, later []item
		seen := map[string]bool{}
		for _, it := range pending {
			if seen[it.res.OrderID] {
				later = append(later, it)
				continue
			}
			seen[it.res.OrderID] = true
			round = append(round, it)
		}
		rejected, err := c.applyRound(ctx, round)
		if err != nil {
			return err
		}
		poison = append(poison, rejected...)
		pending = later
	}

	// Poison in log order, so the DLQ keeps each partition's order.
	slices.SortFunc(poison, func(a, b dead) int {
		return cmp.Or(cmp.Compare(a.rec.Partition, b.rec.Partition), cmp.Compare(a.rec.Offset, b.rec.Offset))
	})
	for _, d := range poison {
		if err := c.retryStep(ctx, "dead-letter", func(ctx context.Context) error { return c.deadLetter(ctx, d.rec, d.cause) }); err != nil {
			return err
		}
	}
	return nil
}

type dead struct {
	rec   *kgo.Record
	cause error
}

type item struct {
	rec *kgo.Record
	res paymentResult
}

// applyRound applies results for distinct orders and accounts for each: applied,
// ignored (a duplicate or a conflict), or returned to go to the DLQ (an
// unknown order, or values the database refuses).
func (c *consumer) applyRound(ctx context.Context, round []item) ([]dead, error) {
	applied, rejected, err := c.apply(ctx, round)
	if err != nil {
		return nil, err
	}
	isRejected := map[*kgo.Record]bool{}
	for _, d := range rejected {
		isRejected[d.rec] = true
	}
	var notApplied []item
	for _, it := range round {
		switch {
		case isRejected[it.rec]:
		case !applied[it.res.OrderID].IsZero():
			c.metrics.resultsApplied(it.res.Status)
			c.metrics.resultLatency.observe(time.Since(applied[it.res.OrderID]).Seconds())
			// The Payment Service's traceparent, if it sent one, names the
			// trace the order began in.
			c.log.InfoContext(recordTrace(ctx, it.rec.Headers), "order status changed", "order_id", it.res.OrderID, "status", it.res.Status)
		default:
			notApplied = append(notApplied, it)
		}
	}
	if len(notApplied) == 0 {
		return rejected, nil
	}
	ids := make([]string, len(notApplied))
	for i, it := range notApplied {
		ids[i] = it.res.OrderID
	}
	var current map[string]string
	if err := c.retryStep(ctx, "read order statuses", func(ctx context.Context) (err error) {
		current, err = orderStatuses(ctx, c.db, ids)
		return err
	}); err != nil {
		return nil, err
	}
	for _, it := range notApplied {
		status, known := current[it.res.OrderID]
		switch {
		case !known:
			rejected = append(rejected, dead{it.rec, fmt.Errorf("%w: %w %s", errPoison, errUnknownOrder, it.res.OrderID)})
		case status == it.res.Status:
			c.metrics.resultsIgnored.Add(1)
			c.log.InfoContext(ctx, "duplicate payment result ignored", "order_id", it.res.OrderID, "status", status)
		default:
			c.metrics.resultsIgnored.Add(1)
			c.log.WarnContext(ctx, "conflicting payment result ignored", "order_id", it.res.OrderID,
				"status", status, "result", it.res.Status)
		}
	}
	return rejected, nil
}

// apply writes items in one transaction, retrying transient failures. A
// permanent one (values the database refuses: SQLSTATE class 22 or 23) is
// the fault of one record or a few: the items are split in halves until
// each such record stands alone, to go to the DLQ, and the rest are applied.
func (c *consumer) apply(ctx context.Context, items []item) (map[string]time.Time, []dead, error) {
	results := make([]paymentResult, len(items))
	for i, it := range items {
		results[i] = it.res
	}
	var applied map[string]time.Time
	err := c.retryStep(ctx, "apply payment results", func(ctx context.Context) (err error) {
		applied, err = applyPaymentResults(ctx, c.db, results)
		if dbPermanent(err) {
			err = fmt.Errorf("%w: the database refused it: %w", errPoison, err)
		}
		return err
	})
	switch {
	case err == nil:
		return applied, nil, nil
	case !errors.Is(err, errPoison):
		return nil, nil, err
	case len(items) == 1:
		return nil, []dead{{items[0].rec, err}}, nil
	}
	half := len(items) / 2
	applied, rejected, err := c.apply(ctx, items[:half])
	if err != nil {
		return nil, nil, err
	}
	applied2, rejected2, err := c.apply(ctx, items[half:])
	if err != nil {
		return nil, nil, err
	}
	if applied == nil {
		applied = map[string]time.Time{}
	}
	maps.Copy(applied, applied2)
	return applied, append(rejected, rejected2...), nil
}

// A failing poll is held, and retried, until it succeeds or a rebalance waits
// for it. With BlockRebalanceOnPoll every rebalance of the group waits for
// the poll in hand: a database down for minutes would block the group for
// minutes, and a replica that could apply results (its own database up, or a
// new one) would get none. kgo signals every rebalance it holds back this way
// (OnPartitionsCallbackBlocked, which fills rebalanceWanted) but the one of
// LeaveGroup, which comes at shutdown, when the poll's ctx has ended; so the
// poll is given back at the signal, and never otherwise.

// errPollReleased: the poll's records failed while a rebalance waited for
// them; they are given back, to be fetched again.
var errPollReleased = errors.New("poll released")

// retryStep runs step until it succeeds, fails permanently (errPoison), fails
// while a rebalance waits (errPollReleased), or ctx ends.
// Each try has its own deadline, so a hung database or broker is a failure to
// retry, not a stuck partition. Only a poll that has failed is given back for
// a rebalance: a healthy try is never cut short.
func (c *consumer) retryStep(ctx context.Context, what string, step func(context.Context) error) error {
	waiting, release := context.WithCancel(ctx)
	defer release()
	go func() {
		select {
		case <-c.rebalanceWanted:
			release()
		case <-waiting.Done():
		}
	}()
	failing, released := false, false
	err := retry(waiting, func(context.Context) error {
		ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		if failing {
			// Failing already, a try waits on a database that may not
			// answer for long: a waiting rebalance ends it too.
			defer context.AfterFunc(waiting, cancel)()
		}
		return step(ctx)
	}, func(err error, wait time.Duration) bool {
		if errors.Is(err, errPoison) {
			return false
		}
		failing = true
		if rebalanceWaits(ctx, waiting) {
			released = true
			return false
		}
		level := slog.LevelWarn
		if !dbTransient(err) && !kafkaTransient(err) {
			level = slog.LevelError // neither the database's nor the broker's weather: a bug
		}
		c.log.Log(ctx, level, "consumer: "+what+" failed, retrying", "err", err, "retry_in", wait)
		return true
	})
	if err != nil && rebalanceWaits(ctx, waiting) {
		released = true // the rebalance came during a try or the wait after a failure
	}
	if released {
		c.log.WarnContext(ctx, "consumer: "+what+" failing; giving the poll back, its records will be fetched again",
			repeatsKey, "consumer: poll released", "err", err)
		return fmt.Errorf("%w: %w", errPollReleased, err)
	}
	return err
}

// rebalanceWaits: waiting ended for a rebalance, not because ctx did.
func rebalanceWaits(ctx, waiting context.Context) bool {
	return waiting.Err() != nil && ctx.Err() == nil
}

// rewind sets each partition of recs back to its first record in them, so
// that the next poll fetches them again. Nothing of them was marked: what was
// applied meanwhile is applied again, and changes nothing. It runs between a
// poll and AllowRebalance, where kgo wants SetOffsets called.
func (c *consumer) rewind(recs []*kgo.Record) {
	offsets := map[string]map[int32]kgo.EpochOffset{}
	for _, r := range recs {
		if offsets[r.Topic] == nil {
			offsets[r.Topic] = map[int32]kgo.EpochOffset{}
		}
		if o, ok := offsets[r.Topic][r.Partition]; !ok || r.Offset < o.Offset {
			offsets[r.Topic][r.Partition] = kgo.EpochOffset{Epoch: r.LeaderEpoch, Offset: r.Offset}
		}
	}
	c.group.SetOffsets(offsets)
}

// The DLQ copy is bounded: its error header is cut to maxErrorHeader bytes,
// and a copy the broker refuses as too large is replaced by its beginning
// (truncatedBytes of key and value, original headers dropped) with a
// "truncated" header saying so. A record is never dropped silently.
const (
	maxErrorHeader = 1 << 10
	truncatedBytes = 16 << 10
)

// deadLetter copies the record to the DLQ with why and where it came from.
// The produce is synchronous: the record is marked only once the copy is safe.
func (c *consumer) deadLetter(ctx context.Context, rec *kgo.Record, cause error) error {
	origin := []kgo.RecordHeader{
		{Key: "error", Value: []byte(clip(cause.Error(), maxErrorHeader))},
		{Key: "original-topic", Value: []byte(rec.Topic)},
		{Key: "original-partition", Value: []byte(strconv.Itoa(int(rec.Partition)))},
		{Key: "original-offset", Value: []byte(strconv.FormatInt(rec.Offset, 10))},
	}
	dlq := &kgo.Record{Topic: c.dlqTopic, Key: rec.Key, Value: rec.Value, Headers: append(origin, rec.Headers...)}
	err := c.producer.ProduceSync(ctx, dlq).FirstErr()
	truncated := false
	if refusedAsTooLarge(err) {
		note := fmt.Sprintf("key: first %d of %d bytes; value: first %d of %d bytes; %d original headers dropped",
			min(len(rec.Key), truncatedBytes), len(rec.Key), min(len(rec.Value), truncatedBytes), len(rec.Value), len(rec.Headers))
		dlq = &kgo.Record{Topic: c.dlqTopic, Key: rec.Key[:min(len(rec.Key), truncatedBytes)],
			Value: rec.Value[:min(len(rec.Value), truncatedBytes)], Headers: append(origin, kgo.RecordHeader{Key: "truncated", Value: []byte(note)})}
		err = c.producer.ProduceSync(ctx, dlq).FirstErr()
		truncated = true
	}
	if err != nil {
		return fmt.Errorf("dead-letter offset %d: %w", rec.Offset, err)
	}
	c.metrics.deadLetteredFor(dlqReason(cause))
	c.log.WarnContext(ctx, "payment result sent to DLQ", "partition", rec.Partition, "offset", rec.Offset,
		"truncated", truncated, "err", clip(cause.Error(), maxErrorHeader))
	return nil
}

// refusedAsTooLarge: the broker (or the client, before sending) will never
// take this record as it is.
func refusedAsTooLarge(err error) bool {
	return errors.Is(err, kerr.MessageTooLarge) || errors.Is(err, kerr.RecordListTooLarge)
}
