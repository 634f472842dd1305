// healthcheck evaluates kubetune's GitOps health checks the way Argo CD and Flux do, with the
// libraries they use: gopher-lua for an Argo CD health.lua, cel-go for Flux healthCheckExprs.
// It reads one JSON request on stdin and writes one JSON result per object on stdout.
//
//	{"argocd": "<health.lua>", "objects": [...]}  ->  [{"status": "...", "message": "..."}, ...]
//	{"flux": {"current": "...", "failed": "...", "inProgress": "..."}, "objects": [...]}  ->  [{"status": "..."}, ...]
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"time"

	"github.com/google/cel-go/cel"
	"github.com/google/cel-go/common/types"
	"github.com/google/cel-go/ext"
	lua "github.com/yuin/gopher-lua"
)

type request struct {
	ArgoCD  string            `json:"argocd"`
	Flux    map[string]string `json:"flux"`
	Objects []map[string]any  `json:"objects"`
}

type result struct {
	Status  string `json:"status"`
	Message string `json:"message,omitempty"`
	Error   string `json:"error,omitempty"`
}

func main() {
	var req request
	dec := json.NewDecoder(os.Stdin)
	dec.UseNumber()
	if err := dec.Decode(&req); err != nil {
		fmt.Fprintln(os.Stderr, "healthcheck: bad request:", err)
		os.Exit(2)
	}
	out := make([]result, 0, len(req.Objects))
	for _, obj := range req.Objects {
		var r result
		var err error
		if req.Flux != nil {
			r, err = flux(req.Flux, obj)
		} else {
			r, err = argocd(req.ArgoCD, obj)
		}
		if err != nil {
			r = result{Error: err.Error()}
		}
		out = append(out, r)
	}
	_ = json.NewEncoder(os.Stdout).Encode(out)
}

// argocd runs a health script as Argo CD runs one from argocd-cm: without Lua's standard libraries
// (only package, base and table), with the object as the global obj, a 1 s limit, and the returned
// table's status checked against Argo CD's health codes.
func argocd(script string, obj map[string]any) (result, error) {
	l := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer l.Close()
	for _, lib := range []struct {
		name string
		fn   lua.LGFunction
	}{{lua.LoadLibName, lua.OpenPackage}, {lua.BaseLibName, lua.OpenBase}, {lua.TabLibName, lua.OpenTable}} {
		if err := l.CallByParam(lua.P{Fn: l.NewFunction(lib.fn), NRet: 0, Protect: true}, lua.LString(lib.name)); err != nil {
			return result{}, err
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	l.SetContext(ctx)
	l.SetGlobal("obj", toLua(l, obj))
	if err := l.DoString(script); err != nil {
		return result{}, err
	}
	ret, ok := l.Get(-1).(*lua.LTable)
	if !ok {
		return result{}, fmt.Errorf("expect table output from Lua script, not %s", l.Get(-1).Type())
	}
	r := result{Status: lua.LVAsString(ret.RawGetString("status")), Message: lua.LVAsString(ret.RawGetString("message"))}
	switch r.Status {
	case "Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown":
		return r, nil
	}
	return result{Status: "Unknown", Message: "Lua returned an invalid health status"}, nil
}

// toLua converts as Argo CD's decodeValue does (JSON numbers as numbers here: the apiserver's
// objects reach Argo CD as int64/float64).
func toLua(l *lua.LState, v any) lua.LValue {
	switch c := v.(type) {
	case bool:
		return lua.LBool(c)
	case json.Number:
		f, _ := c.Float64()
		return lua.LNumber(f)
	case string:
		return lua.LString(c)
	case []any:
		t := l.CreateTable(len(c), 0)
		for _, item := range c {
			t.Append(toLua(l, item))
		}
		return t
	case map[string]any:
		t := l.CreateTable(0, len(c))
		for k, item := range c {
			t.RawSetH(lua.LString(k), toLua(l, item))
		}
		return t
	}
	return lua.LNil
}

// flux evaluates healthCheckExprs as kustomize-controller does (fluxcd/pkg/runtime/cel, RFC 0009):
// a status.observedGeneration other than metadata.generation is InProgress; then inProgress,
// failed, current in that order; none true is InProgress.
func flux(exprs map[string]string, obj map[string]any) (result, error) {
	obj = normalize(obj).(map[string]any)
	if st, ok := obj["status"].(map[string]any); ok {
		if og, ok := st["observedGeneration"]; ok {
			if md, ok := obj["metadata"].(map[string]any); ok {
				if g, ok := md["generation"]; ok && g != og {
					return result{Status: "InProgress"}, nil
				}
			}
		}
	}
	for _, e := range []struct{ key, status string }{{"inProgress", "InProgress"}, {"failed", "Failed"}, {"current", "Current"}} {
		src := exprs[e.key]
		if src == "" {
			continue
		}
		ok, err := evalBool(src, obj)
		if err != nil {
			return result{}, err
		}
		if ok {
			return result{Status: e.status}, nil
		}
	}
	return result{Status: "InProgress"}, nil
}

func evalBool(src string, data map[string]any) (bool, error) {
	env, err := cel.NewEnv(cel.HomogeneousAggregateLiterals(), cel.EagerlyValidateDeclarations(true),
		cel.DefaultUTCTimeZone(true), cel.CrossTypeNumericComparisons(true), cel.OptionalTypes(),
		ext.Strings(), ext.Sets(), ext.Encoders())
	if err != nil {
		return false, err
	}
	ast, iss := env.Parse(src)
	if iss != nil && iss.Err() != nil {
		return false, fmt.Errorf("parse %q: %s", src, iss.String())
	}
	prg, err := env.Program(ast, cel.EvalOptions(cel.OptOptimize), cel.InterruptCheckFrequency(100))
	if err != nil {
		return false, err
	}
	val, _, err := prg.Eval(data)
	if err != nil {
		return false, fmt.Errorf("evaluate %q: %w", src, err)
	}
	b, ok := val.(types.Bool)
	if !ok {
		return false, fmt.Errorf("%q is not a boolean", src)
	}
	return bool(b), nil
}

// normalize turns JSON numbers into int64 or float64, as unstructured objects hold them.
func normalize(v any) any {
	switch c := v.(type) {
	case json.Number:
		if i, err := c.Int64(); err == nil {
			return i
		}
		f, _ := c.Float64()
		return f
	case []any:
		for i := range c {
			c[i] = normalize(c[i])
		}
	case map[string]any:
		for k := range c {
			c[k] = normalize(c[k])
		}
	}
	return v
}
