import json,glob,statistics as S,sys
for d in sys.argv[1:]:
    for f in glob.glob(d+'/st/*.jsonl') or glob.glob(d+'/*.jsonl'):
        L=[json.loads(l) for l in open(f)]
        if not L: continue
        out=[d.split('/')[-1]]
        for b in (1,8):
            dd=[s for s in L if len(s['n'])==b and all(n==1 for n in s['n'])]
            if not dd: continue
            dts=[s['dt']*1e3 for s in dd]; cpus=[s['cpu']*1e3 for s in dd]
            out.append('b%d n=%d dt p50 %.1f p90 %.1f cpu %.1f'%(b,len(dd),S.median(dts),sorted(dts)[9*len(dts)//10],S.median(cpus)))
        pre=[s for s in L if any(n>1 for n in s['n'])]
        out.append('prefill/mixed steps %d total %.2fs tokens %d'%(len(pre),sum(s['dt'] for s in pre),sum(sum(n for n in s['n'] if n>1) for s in pre)))
        print(' | '.join(out))
