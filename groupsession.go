package main

// groupsession.go sets how long the consumer group waits for a member that
// stops heartbeating (its session) before it gives that member's partitions
// to the others: KAFKA_SESSION_TIMEOUT, under either group protocol.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
)

// Group config names (Kafka 4.0 and later, KIP-848): the broker keeps each
// member's session, and applies these to the group's members.
const (
	groupSessionConfig   = "consumer.session.timeout.ms"
	groupHeartbeatConfig = "consumer.heartbeat.interval.ms"
)

// groupHeartbeat is the heartbeat interval asked for beside a session: a
// fifth of it, as Kafka's defaults are (45 s, with a heartbeat ceiling near
// it). A member that died is noticed at most a session after its last
// heartbeat, and the one that takes its partitions over learns of them at its
// next heartbeat.
func groupHeartbeat(session time.Duration) time.Duration {
	return max(time.Second, session/5)
}

// setGroupSession makes session the consumer group's, at every start, and
// returns the session in force. Under the classic protocol the client
// states its session when it joins (kgo.SessionTimeout), so nothing is to
// be set. Under KIP-848 the broker holds it, per group: the service sets its
// group's (an IncrementalAlterConfigs of the group's configs) before or as
// it joins. A broker that refuses (the value outside its
// group.consumer.min/max settings, no permission, a broker before 4.0 that
// knows no group configs) leaves the group as it is: one WARN names the
// broker settings to change, and the session in force is read back and
// returned. Broker weather is retried until ctx ends.
func setGroupSession(ctx context.Context, cl *kgo.Client, log *slog.Logger, group, protocol string, session time.Duration) time.Duration {
	if protocol == groupProtocolClassic {
		return session
	}
	var inForce time.Duration
	err := retry(ctx, func(ctx context.Context) error {
		ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		next, err := speaksKIP848(ctx, cl)
		switch {
		case err != nil:
			return err
		case !next:
			inForce = session // kgo falls back to the classic protocol by itself
			return nil
		}
		refused, err := alterGroupSession(ctx, cl, group, session)
		if err != nil {
			return err
		}
		inForce = session
		if refused != nil {
			// 0 when it cannot be read either: unknown.
			inForce, _ = describeGroupSession(ctx, cl, group)
			log.WarnContext(ctx, "consumer group: the broker refused the group's session; a replica that dies "+
				"holds its partitions for the session in force. Allow it on the brokers (group.consumer.min.session.timeout.ms "+
				"and group.consumer.min.heartbeat.interval.ms at most these, or an ALTER_CONFIGS permission on the group) "+
				"or set KAFKA_SESSION_TIMEOUT within what they allow",
				"group", group, "session", session, "heartbeat", groupHeartbeat(session), "refused", refused,
				"session_in_force", inForce)
		}
		return nil
	}, func(err error, wait time.Duration) bool {
		log.WarnContext(ctx, "consumer group: could not set the group's session yet, retrying", "err", err, "retry_in", wait)
		return true
	})
	if err != nil {
		return 0 // shutdown came first
	}
	return inForce
}

// speaksKIP848 asks a broker whether it has the consumer group protocol as kgo
// uses it: ConsumerGroupHeartbeat version 1, Kafka 4.0 and later (3.x brokers
// answer version 0, an early access that kgo passes by).
func speaksKIP848(ctx context.Context, cl *kgo.Client) (bool, error) {
	resp, err := kmsg.NewPtrApiVersionsRequest().RequestWith(ctx, cl)
	if err != nil {
		return false, fmt.Errorf("api versions: %w", err)
	}
	for _, k := range resp.ApiKeys {
		if k.ApiKey == kmsg.ConsumerGroupHeartbeat.Int16() {
			return k.MaxVersion >= 1, nil
		}
	}
	return false, nil
}

// alterGroupSession sets the group's session and heartbeat. refused is the
// broker's answer when it would not; err is a failure to ask it.
func alterGroupSession(ctx context.Context, cl *kgo.Client, group string, session time.Duration) (refused, err error) {
	req := kmsg.NewPtrIncrementalAlterConfigsRequest()
	res := kmsg.NewIncrementalAlterConfigsRequestResource()
	res.ResourceType = kmsg.ConfigResourceTypeGroupConfig
	res.ResourceName = group
	for name, d := range map[string]time.Duration{groupSessionConfig: session, groupHeartbeatConfig: groupHeartbeat(session)} {
		c := kmsg.NewIncrementalAlterConfigsRequestResourceConfig()
		c.Name, c.Op, c.Value = name, kmsg.IncrementalAlterConfigOpSet, kmsg.StringPtr(strconv.FormatInt(d.Milliseconds(), 10))
		res.Configs = append(res.Configs, c)
	}
	req.Resources = append(req.Resources, res)
	resp, err := req.RequestWith(ctx, cl)
	if err != nil {
		return nil, fmt.Errorf("alter group configs: %w", err)
	}
	if len(resp.Resources) != 1 {
		return nil, fmt.Errorf("alter group configs: %d resources in the answer", len(resp.Resources))
	}
	r := resp.Resources[0]
	if err := kerr.ErrorForCode(r.ErrorCode); err != nil {
		if kafkaTransient(err) {
			return nil, fmt.Errorf("alter group configs: %w", err)
		}
		if r.ErrorMessage != nil {
			err = fmt.Errorf("%w: %s", err, *r.ErrorMessage)
		}
		return err, nil
	}
	return nil, nil
}

// describeGroupSession reads the session in force for the group: its own
// setting, or the broker's default.
func describeGroupSession(ctx context.Context, cl *kgo.Client, group string) (time.Duration, error) {
	req := kmsg.NewPtrDescribeConfigsRequest()
	res := kmsg.NewDescribeConfigsRequestResource()
	res.ResourceType = kmsg.ConfigResourceTypeGroupConfig
	res.ResourceName = group
	res.ConfigNames = []string{groupSessionConfig}
	req.Resources = append(req.Resources, res)
	resp, err := req.RequestWith(ctx, cl)
	if err != nil {
		return 0, fmt.Errorf("describe group configs: %w", err)
	}
	for _, r := range resp.Resources {
		if err := kerr.ErrorForCode(r.ErrorCode); err != nil {
			return 0, fmt.Errorf("describe group configs: %w", err)
		}
		for _, c := range r.Configs {
			if c.Name == groupSessionConfig && c.Value != nil {
				ms, err := strconv.Atoi(*c.Value)
				if err != nil {
					return 0, fmt.Errorf("describe group configs: %s=%q", c.Name, *c.Value)
				}
				return time.Duration(ms) * time.Millisecond, nil
			}
		}
	}
	return 0, errors.New("describe group configs: no " + groupSessionConfig)
}
